// qk_norm_<wdt>: per-head RMSNorm of q and k in place (Qwen3, Gemma 3); one simdgroup (threadgroup of 32) per
// (token, head): the head's sum of squares by simd_sum, then each lane scales its elements.
// Host: src/metal/dispatch_geometry.cpp.
#include <metal_stdlib>
#include "op_args.h"
using namespace metal;
using namespace metal_engine;

template <typename W, typename A>
kernel void qk_norm(constant QKNormArgs& args [[buffer(0)]],
                    device A* q [[buffer(1)]],                 // [num_tokens, q_stride]
                    device A* k [[buffer(2)]],                 // [num_tokens, k_stride]
                    device const W* q_weight [[buffer(3)]],    // [head_dim]
                    device const W* k_weight [[buffer(4)]],    // [head_dim]
                    uint2 group [[threadgroup_position_in_grid]],  // (token, head: q's then k's)
                    uint lane [[thread_index_in_simdgroup]]) {
  const int t = group.x, h = group.y, d = args.head_dim;
  const bool is_q = h < args.num_heads;
  device A* x = is_q ? q + long(t) * args.q_stride + h * d : k + long(t) * args.k_stride + (h - args.num_heads) * d;
  device const W* w = is_q ? q_weight : k_weight;
  float ss = 0.0f;
  for (int i = lane; i < d; i += 32) ss += float(x[i]) * float(x[i]);
  ss = simd_sum(ss);
  const float inv = rsqrt(ss / float(d) + args.eps);
  for (int i = lane; i < d; i += 32) x[i] = A(float(w[i]) * (float(x[i]) * inv));
}

template [[host_name("qk_norm_f32")]] kernel decltype(qk_norm<float, float>) qk_norm<float, float>;
template [[host_name("qk_norm_f16")]] kernel decltype(qk_norm<half, float>) qk_norm<half, float>;
template [[host_name("qk_norm_bf16")]] kernel decltype(qk_norm<bfloat, float>) qk_norm<bfloat, float>;
template [[host_name("qk_norm_f16_act_f16")]] kernel decltype(qk_norm<half, half>) qk_norm<half, half>;
template [[host_name("qk_norm_bf16_act_bf16")]] kernel decltype(qk_norm<bfloat, bfloat>) qk_norm<bfloat, bfloat>;
