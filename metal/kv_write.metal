// kv_write_<kvdt>: each token's k and v into its cache slot (slot < 0 is skipped), one threadgroup per token.
#include <metal_stdlib>
#include "op_args.h"
using namespace metal;
using namespace metal_engine;

template <typename KV, typename A>
kernel void kv_write(constant KVWriteArgs& args [[buffer(0)]],
                     device const A* k [[buffer(1)]],                // [num_tokens, k_stride]
                     device const A* v [[buffer(2)]],                // [num_tokens, v_stride]
                     device const long* slot_mapping [[buffer(3)]],  // [num_tokens]
                     device KV* k_cache [[buffer(4)]],               // [num_blocks, block_size, kv_heads, hd]
                     device KV* v_cache [[buffer(5)]],
                     uint t [[threadgroup_position_in_grid]],
                     uint tid [[thread_position_in_threadgroup]],
                     uint ntg [[threads_per_threadgroup]]) {
  const long slot = slot_mapping[t];
  if (slot < 0 || slot >= args.num_slots) return;
  const int row = args.num_kv_heads * args.head_dim;
  for (int i = tid; i < row; i += ntg) {
    k_cache[slot * row + i] = KV(float(k[long(t) * args.k_stride + i]));
    v_cache[slot * row + i] = KV(float(v[long(t) * args.v_stride + i]));
  }
}

template [[host_name("kv_write_f32")]] kernel decltype(kv_write<float, float>) kv_write<float, float>;
template [[host_name("kv_write_f16")]] kernel decltype(kv_write<half, float>) kv_write<half, float>;
template [[host_name("kv_write_bf16")]] kernel decltype(kv_write<bfloat, float>) kv_write<bfloat, float>;
template [[host_name("kv_write_f16_act_f16")]] kernel decltype(kv_write<half, half>) kv_write<half, half>;
template [[host_name("kv_write_bf16_act_bf16")]] kernel decltype(kv_write<bfloat, bfloat>) kv_write<bfloat, bfloat>;
