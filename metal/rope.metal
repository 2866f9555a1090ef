// rope: rotary embedding of q and k in place, HF rotate_half layout over the first rotary_dim dims of each head;
// one threadgroup per token, one thread per (head, pair) with pairs (i, i + rotary_dim/2); cos and sin scaled by
// args.scaling (yarn, longrope).
#include <metal_stdlib>
#include "op_args.h"
using namespace metal;
using namespace metal_engine;

template <typename A>
kernel void rope(constant RopeArgs& args [[buffer(0)]],
                 device const int* positions [[buffer(1)]],  // [num_tokens]
                 device const float* inv_freq [[buffer(2)]], // [rotary_dim / 2]
                 device A* q [[buffer(3)]],                  // [num_tokens, q_stride]
                 device A* k [[buffer(4)]],                  // [num_tokens, k_stride]
                 uint t [[threadgroup_position_in_grid]],
                 uint tid [[thread_position_in_threadgroup]],
                 uint ntg [[threads_per_threadgroup]]) {
  const int half_dim = args.rotary_dim / 2;
  const int pairs = (args.num_heads + args.num_kv_heads) * half_dim;
  const float p = float(positions[t]);
  for (int j = tid; j < pairs; j += ntg) {
    const int h = j / half_dim, i = j % half_dim;
    device A* base = h < args.num_heads ? q + long(t) * args.q_stride + h * args.head_dim
                                            : k + long(t) * args.k_stride + (h - args.num_heads) * args.head_dim;
    const float angle = p * inv_freq[i];
    const float c = precise::cos(angle) * args.scaling, s = precise::sin(angle) * args.scaling;
    const float x0 = float(base[i]), x1 = float(base[i + half_dim]);
    base[i] = A(x0 * c - x1 * s);
    base[i + half_dim] = A(x1 * c + x0 * s);
  }
}

template [[host_name("rope")]] kernel decltype(rope<float>) rope<float>;
template [[host_name("rope_act_f16")]] kernel decltype(rope<half>) rope<half>;
template [[host_name("rope_act_bf16")]] kernel decltype(rope<bfloat>) rope<bfloat>;
