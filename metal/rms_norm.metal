// rms_norm_<wdt>: one threadgroup per row. residual += x (if asked), then
// out = residual * rsqrt(mean(residual^2) + eps) * weight. Host: src/metal/dispatch_geometry.cpp.
// Whether to add the residual is a function constant (one pipeline each, the branch compiled away); the host
// sets it from RmsNormArgs::add_residual (src/metal/metal_kernels.cpp).
#include <metal_stdlib>
#include "op_args.h"
using namespace metal;
using namespace metal_engine;

constant bool kAddResidual [[function_constant(0)]];

template <typename W, typename A>
kernel void rms_norm(constant RmsNormArgs& args [[buffer(0)]],
                     device A* x [[buffer(1)]],                // [rows, dim]; may alias out
                     device A* residual [[buffer(2)]],         // [rows, dim], in/out when add_residual
                     device const W* weight [[buffer(3)]],     // [dim]
                     device A* out [[buffer(4)]],              // [rows, dim]
                     uint row [[threadgroup_position_in_grid]],
                     uint tid [[thread_position_in_threadgroup]],
                     uint ntg [[threads_per_threadgroup]],
                     uint lane [[thread_index_in_simdgroup]],
                     uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float partial[32];
  threadgroup float total[1];
  const int dim = args.dim;
  device A* xr = x + row * dim;
  device A* src = xr;
  if (kAddResidual) {  // the sum rounds to A, as the residual stream is stored
    src = residual + row * dim;
    for (int i = tid; i < dim; i += ntg) src[i] = A(float(src[i]) + float(xr[i]));
  }
  float ss = 0.0f;
  for (int i = tid; i < dim; i += ntg) ss += float(src[i]) * float(src[i]);
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
  device A* o = out + row * dim;
  for (int i = tid; i < dim; i += ntg) o[i] = A(float(weight[i]) * (float(src[i]) * inv));
}

template [[host_name("rms_norm_f32")]] kernel decltype(rms_norm<float, float>) rms_norm<float, float>;
template [[host_name("rms_norm_f16")]] kernel decltype(rms_norm<half, float>) rms_norm<half, float>;
template [[host_name("rms_norm_bf16")]] kernel decltype(rms_norm<bfloat, float>) rms_norm<bfloat, float>;
template [[host_name("rms_norm_f16_act_f16")]] kernel decltype(rms_norm<half, half>) rms_norm<half, half>;
template [[host_name("rms_norm_bf16_act_bf16")]] kernel decltype(rms_norm<bfloat, bfloat>) rms_norm<bfloat, bfloat>;
