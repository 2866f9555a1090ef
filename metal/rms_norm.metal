// rms_norm_<wdt>: one threadgroup per row. residual += x (if asked), then
// out = residual * rsqrt(mean(residual^2) + eps) * weight. Host: src/metal/dispatch_geometry.cpp.
#include <metal_stdlib>
#include "op_args.h"
using namespace metal;
using namespace metal_engine;

template <typename W>
kernel void rms_norm(constant RmsNormArgs& args [[buffer(0)]],
                     device float* x [[buffer(1)]],            // [rows, dim]; may alias out
                     device float* residual [[buffer(2)]],     // [rows, dim], in/out when add_residual
                     device const W* weight [[buffer(3)]],     // [dim]
                     device float* out [[buffer(4)]],          // [rows, dim]
                     uint row [[threadgroup_position_in_grid]],
                     uint tid [[thread_position_in_threadgroup]],
                     uint ntg [[threads_per_threadgroup]],
                     uint lane [[thread_index_in_simdgroup]],
                     uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float partial[32];
  threadgroup float total[1];
  const int dim = args.dim;
  device float* xr = x + row * dim;
  device float* src = xr;
  if (args.add_residual) {
    src = residual + row * dim;
    for (int i = tid; i < dim; i += ntg) src[i] += xr[i];
  }
  float ss = 0.0f;
  for (int i = tid; i < dim; i += ntg) ss += src[i] * src[i];
  ss = simd_sum(ss);
  if (lane == 0) partial[sg] = ss;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg == 0) {
    float v = lane < (ntg + 31) / 32 ? partial[lane] : 0.0f;
    v = simd_sum(v);
    if (lane == 0) total[0] = v;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const float inv = rsqrt(total[0] / float(dim) + args.eps);
  device float* o = out + row * dim;
  for (int i = tid; i < dim; i += ntg) o[i] = float(weight[i]) * (src[i] * inv);
}

template [[host_name("rms_norm_f32")]] kernel decltype(rms_norm<float>) rms_norm<float>;
template [[host_name("rms_norm_f16")]] kernel decltype(rms_norm<half>) rms_norm<half>;
template [[host_name("rms_norm_bf16")]] kernel decltype(rms_norm<bfloat>) rms_norm<bfloat>;
