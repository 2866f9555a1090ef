// embedding_<wdt>: out[t, :] = table[token_ids[t], :] * scale, one threadgroup per token.
#include <metal_stdlib>
#include "op_args.h"
using namespace metal;
using namespace metal_engine;

template <typename W, typename A>
kernel void embedding(constant EmbeddingArgs& args [[buffer(0)]],
                      device const int* token_ids [[buffer(1)]],  // [num_tokens]
                      device const W* table [[buffer(2)]],        // [vocab, hidden]
                      device A* out [[buffer(3)]],                // [num_tokens, hidden]
                      uint t [[threadgroup_position_in_grid]],
                      uint tid [[thread_position_in_threadgroup]],
                      uint ntg [[threads_per_threadgroup]]) {
  device const W* row = table + long(token_ids[t]) * args.hidden;
  for (int i = tid; i < args.hidden; i += ntg) out[long(t) * args.hidden + i] = A(float(row[i]) * args.scale);
}

template [[host_name("embedding_f32")]] kernel decltype(embedding<float, float>) embedding<float, float>;
template [[host_name("embedding_f16")]] kernel decltype(embedding<half, float>) embedding<half, float>;
template [[host_name("embedding_bf16")]] kernel decltype(embedding<bfloat, float>) embedding<bfloat, float>;
template [[host_name("embedding_f16_act_f16")]] kernel decltype(embedding<half, half>) embedding<half, half>;
template [[host_name("embedding_bf16_act_bf16")]] kernel decltype(embedding<bfloat, bfloat>) embedding<bfloat, bfloat>;
