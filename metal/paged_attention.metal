// paged_attention_<kvdt>: causal (optionally sliding-window) GQA attention of every query token over its
// sequence's keys in the paged KV cache; one varlen kernel for prefill chunks, chunks over cached pages and
// decode rows. One threadgroup per (query token, KV head) serves all the KV head's query heads, so each
// key and value is read once for the group. Its 4 simdgroups take every 4th key, lanes split head_dim,
// and each keeps an online softmax (running max, sum, output); the 4 partial results are merged at the end.
// Limits (checked by the host): head_dim <= 128, num_heads / num_kv_heads <= 8.
#include <metal_stdlib>
#include "op_args.h"
using namespace metal;
using namespace metal_engine;

constant int kAttnSimdgroups = 4;
constant int kMaxGroup = 8;        // query heads per KV head
constant int kMaxDimPerLane = 4;   // head_dim <= 4 x 32
constant int kMaxHeadDim = 128;

template <typename KV>
kernel void paged_attention(constant PagedAttentionArgs& args [[buffer(0)]],
                            device const float* q [[buffer(1)]],              // [num_tokens, q_stride]
                            device const KV* k_cache [[buffer(2)]],           // [blocks, block_size, kv_heads, hd]
                            device const KV* v_cache [[buffer(3)]],
                            device const int* block_tables [[buffer(4)]],     // [num_seqs, block_table_width]
                            device const int* query_start_loc [[buffer(5)]],  // [num_seqs + 1]
                            device const int* seq_lens [[buffer(6)]],         // [num_seqs]
                            device float* out [[buffer(7)]],                  // [num_tokens, num_heads * hd]
                            uint3 tg [[threadgroup_position_in_grid]],
                            uint tid [[thread_index_in_threadgroup]],
                            uint lane [[thread_index_in_simdgroup]],
                            uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float part_max[kAttnSimdgroups * kMaxGroup];
  threadgroup float part_sum[kAttnSimdgroups * kMaxGroup];
  threadgroup float part_out[kAttnSimdgroups * kMaxGroup * kMaxHeadDim];
  const int t = int(tg.x), g = int(tg.y), hd = args.head_dim;
  const int group = args.num_heads / args.num_kv_heads;
  int s = 0;
  while (s + 1 < args.num_seqs && query_start_loc[s + 1] <= t) ++s;
  const int qlen = query_start_loc[s + 1] - query_start_loc[s];
  const int pos = seq_lens[s] - qlen + (t - query_start_loc[s]);  // this query's context position
  const int first = args.sliding_window > 0 ? max(0, pos - args.sliding_window + 1) : 0;
  device const int* bt = block_tables + long(s) * args.block_table_width;
  const long slot_stride = long(args.num_kv_heads) * hd;

  float qv[kMaxGroup][kMaxDimPerLane];
  float o[kMaxGroup][kMaxDimPerLane];
  float m[kMaxGroup];
  float l[kMaxGroup];
  for (int h = 0; h < group; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.0f;
    for (int i = 0; i < kMaxDimPerLane; ++i) {
      const int d = int(lane) + 32 * i;
      qv[h][i] = d < hd ? q[long(t) * args.q_stride + (g * group + h) * hd + d] : 0.0f;
      o[h][i] = 0.0f;
    }
  }
  for (int j = first + int(sg); j <= pos; j += kAttnSimdgroups) {  // uniform per simdgroup
    const long slot = long(bt[j / args.block_size]) * args.block_size + j % args.block_size;
    device const KV* kj = k_cache + slot * slot_stride + g * hd;
    device const KV* vj = v_cache + slot * slot_stride + g * hd;
    float kk[kMaxDimPerLane];
    float vv[kMaxDimPerLane];
    for (int i = 0; i < kMaxDimPerLane; ++i) {
      const int d = int(lane) + 32 * i;
      kk[i] = d < hd ? float(kj[d]) : 0.0f;
      vv[i] = d < hd ? float(vj[d]) : 0.0f;
    }
    for (int h = 0; h < group; ++h) {
      float partial = 0.0f;
      for (int i = 0; i < kMaxDimPerLane; ++i) partial += qv[h][i] * kk[i];
      const float score = simd_sum(partial) * args.scale;
      const float m_new = max(m[h], score);
      const float c = exp(m[h] - m_new);
      const float p = exp(score - m_new);
      l[h] = l[h] * c + p;
      for (int i = 0; i < kMaxDimPerLane; ++i) o[h][i] = o[h][i] * c + p * vv[i];
      m[h] = m_new;
    }
  }
  for (int h = 0; h < group; ++h) {
    const int idx = int(sg) * kMaxGroup + h;
    if (lane == 0) {
      part_max[idx] = m[h];
      part_sum[idx] = l[h];
    }
    for (int i = 0; i < kMaxDimPerLane; ++i) {
      const int d = int(lane) + 32 * i;
      if (d < hd) part_out[idx * kMaxHeadDim + d] = o[h][i];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int e = int(tid); e < group * hd; e += kAttnSimdgroups * 32) {
    const int h = e / hd, d = e % hd;
    float mx = -INFINITY;
    for (int w = 0; w < kAttnSimdgroups; ++w) mx = max(mx, part_max[w * kMaxGroup + h]);
    float num = 0.0f, den = 0.0f;
    for (int w = 0; w < kAttnSimdgroups; ++w) {
      const float f = exp(part_max[w * kMaxGroup + h] - mx);  // 0 for a simdgroup that saw no key
      num += part_out[(w * kMaxGroup + h) * kMaxHeadDim + d] * f;
      den += part_sum[w * kMaxGroup + h] * f;
    }
    out[long(t) * args.num_heads * hd + (g * group + h) * hd + d] = num / den;
  }
}

template [[host_name("paged_attention_f32")]] kernel decltype(paged_attention<float>) paged_attention<float>;
template [[host_name("paged_attention_f16")]] kernel decltype(paged_attention<half>) paged_attention<half>;
template [[host_name("paged_attention_bf16")]] kernel decltype(paged_attention<bfloat>) paged_attention<bfloat>;
