// Paged attention: causal (optionally sliding-window) GQA attention of every query token over its
// sequence's keys in the paged KV cache, for prefill chunks, chunks over cached pages and decode rows alike.
// A threadgroup serves all query heads of one KV head, so each key and value is read once for the group;
// its 4 simdgroups take every 4th key of their range, lanes split head_dim, and each keeps an online softmax
// (running max, sum, output) that the threadgroup merges at the end.
//  - paged_attention_<kvdt>: one threadgroup per (query token, KV head) over all its keys;
//  - paged_attention_split_<kvdt> + paged_attention_reduce: the keys cut into partitions (vLLM's v2), one
//    threadgroup per (row, KV head, partition), for long contexts; the reduce kernel merges partitions.
//  - paged_attention_decode_<kvdt>: paged_attention fused with the KV write of the new token, for steps
//    where every sequence has one new token: the threadgroup of (row, KV head) writes that head's k and v
//    into the row's slot, then (after a device-memory barrier) attends over them with the cached keys.
// Lanes split head_dim: each keeps ceil(head_dim / 32) values of q and of the output per query head of its
// group. Function constant 0 (kWideHeads) picks the register budget: 4 values a lane for up to 8 query heads
// (head_dim <= 128), or 8 values a lane for up to 4 (head_dim <= 256: Gemma); the host picks it from head_dim.
// Limits (checked by the host): head_dim <= 256, num_heads / num_kv_heads <= 8, and their product <= 1024.
#include <metal_stdlib>
#include "op_args.h"
using namespace metal;
using namespace metal_engine;

constant bool kWideHeads [[function_constant(0)]];

constant int kAttnSimdgroups = 4;
constant int kMaxGroup = 8;         // query heads per KV head
constant int kMaxGroupDims = 1024;  // query heads per KV head x head_dim: one simdgroup's merged output

// Where query row t sits: its sequence, context position, and first visible key.
struct RowInfo {
  int seq;
  int pos;
  int first;
};

inline RowInfo row_info(constant PagedAttentionArgs& a, device const int* query_start_loc,
                        device const int* seq_lens, int t) {
  int s = 0;
  while (s + 1 < a.num_seqs && query_start_loc[s + 1] <= t) ++s;
  const int qlen = query_start_loc[s + 1] - query_start_loc[s];
  const int pos = seq_lens[s] - qlen + (t - query_start_loc[s]);
  RowInfo r;
  r.seq = s;
  r.pos = pos;
  r.first = a.sliding_window > 0 ? max(0, pos - a.sliding_window + 1) : 0;
  return r;
}

// Keys [begin, end] of row t for KV head g; leaves this threadgroup's merged result for each query head h
// of the group in part_max[h], part_sum[h] and part_out[h * head_dim + d] (sum-normalised, 0 if no key).
// Each lane holds kDimPerLane values of a head (head_dim <= 32 x kDimPerLane) for up to kGroup query heads.
template <typename KV, typename A, int kDimPerLane, int kGroup>
inline void attend_range(constant PagedAttentionArgs& a, device const A* q, device const KV* k_cache,
                         device const KV* v_cache, device const int* bt, int t, int g, int begin, int end,
                         threadgroup float* sg_max, threadgroup float* sg_sum, threadgroup float* sg_out,
                         threadgroup float* part_max, threadgroup float* part_sum, threadgroup float* part_out,
                         uint tid, uint lane, uint sg) {
  const int hd = a.head_dim, group = a.num_heads / a.num_kv_heads;
  const long slot_stride = long(a.num_kv_heads) * hd;
  float qv[kGroup][kDimPerLane];
  float o[kGroup][kDimPerLane];
  float m[kGroup];
  float l[kGroup];
  for (int h = 0; h < group; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.0f;
    for (int i = 0; i < kDimPerLane; ++i) {
      const int d = int(lane) + 32 * i;
      qv[h][i] = d < hd ? float(q[long(t) * a.q_stride + (g * group + h) * hd + d]) : 0.0f;
      o[h][i] = 0.0f;
    }
  }
  for (int j = begin + int(sg); j <= end; j += kAttnSimdgroups) {  // uniform per simdgroup
    const long slot = long(bt[j / a.block_size]) * a.block_size + j % a.block_size;
    device const KV* kj = k_cache + slot * slot_stride + g * hd;
    device const KV* vj = v_cache + slot * slot_stride + g * hd;
    float kk[kDimPerLane];
    float vv[kDimPerLane];
    for (int i = 0; i < kDimPerLane; ++i) {
      const int d = int(lane) + 32 * i;
      kk[i] = d < hd ? float(kj[d]) : 0.0f;
      vv[i] = d < hd ? float(vj[d]) : 0.0f;
    }
    for (int h = 0; h < group; ++h) {
      float partial = 0.0f;
      for (int i = 0; i < kDimPerLane; ++i) partial += qv[h][i] * kk[i];
      float score = simd_sum(partial) * a.scale;
      if (a.softcap > 0.0f) score = a.softcap * precise::tanh(score / a.softcap);
      const float m_new = max(m[h], score);
      const float c = exp(m[h] - m_new);
      const float p = exp(score - m_new);
      l[h] = l[h] * c + p;
      for (int i = 0; i < kDimPerLane; ++i) o[h][i] = o[h][i] * c + p * vv[i];
      m[h] = m_new;
    }
  }
  for (int h = 0; h < group; ++h) {
    const int idx = int(sg) * kMaxGroup + h;
    if (lane == 0) {
      sg_max[idx] = m[h];
      sg_sum[idx] = l[h];
    }
    for (int i = 0; i < kDimPerLane; ++i) {
      const int d = int(lane) + 32 * i;
      if (d < hd) sg_out[int(sg) * kMaxGroupDims + h * hd + d] = o[h][i];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int e = int(tid); e < group * hd; e += kAttnSimdgroups * 32) {
    const int h = e / hd, d = e % hd;
    float mx = -INFINITY;
    for (int w = 0; w < kAttnSimdgroups; ++w) mx = max(mx, sg_max[w * kMaxGroup + h]);
    float num = 0.0f, den = 0.0f;
    for (int w = 0; w < kAttnSimdgroups; ++w) {
      const float f = mx == -INFINITY ? 0.0f : exp(sg_max[w * kMaxGroup + h] - mx);  // 0: no key seen
      num += sg_out[w * kMaxGroupDims + e] * f;
      den += sg_sum[w * kMaxGroup + h] * f;
    }
    part_out[e] = den > 0.0f ? num / den : 0.0f;
    if (d == 0) {
      part_max[h] = mx;
      part_sum[h] = den;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

template <typename KV, typename A>
kernel void paged_attention(constant PagedAttentionArgs& args [[buffer(0)]],
                            device const A* q [[buffer(1)]],                  // [num_tokens, q_stride]
                            device const KV* k_cache [[buffer(2)]],           // [blocks, block_size, kv_heads, hd]
                            device const KV* v_cache [[buffer(3)]],
                            device const int* block_tables [[buffer(4)]],     // [num_seqs, block_table_width]
                            device const int* query_start_loc [[buffer(5)]],  // [num_seqs + 1]
                            device const int* seq_lens [[buffer(6)]],         // [num_seqs]
                            device A* out [[buffer(7)]],                      // [num_tokens, num_heads * hd]
                            uint3 tg [[threadgroup_position_in_grid]],
                            uint tid [[thread_index_in_threadgroup]],
                            uint lane [[thread_index_in_simdgroup]],
                            uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float sg_max[kAttnSimdgroups * kMaxGroup];
  threadgroup float sg_sum[kAttnSimdgroups * kMaxGroup];
  threadgroup float sg_out[kAttnSimdgroups * kMaxGroupDims];
  threadgroup float res_max[kMaxGroup];
  threadgroup float res_sum[kMaxGroup];
  threadgroup float res_out[kMaxGroupDims];
  const int t = int(tg.x), g = int(tg.y), hd = args.head_dim, group = args.num_heads / args.num_kv_heads;
  const RowInfo r = row_info(args, query_start_loc, seq_lens, t);
  device const int* bt = block_tables + long(r.seq) * args.block_table_width;
  if (kWideHeads)
    attend_range<KV, A, 8, 4>(args, q, k_cache, v_cache, bt, t, g, r.first, r.pos, sg_max, sg_sum, sg_out, res_max,
                              res_sum, res_out, tid, lane, sg);
  else
    attend_range<KV, A, 4, 8>(args, q, k_cache, v_cache, bt, t, g, r.first, r.pos, sg_max, sg_sum, sg_out, res_max,
                              res_sum, res_out, tid, lane, sg);
  for (int e = int(tid); e < group * hd; e += kAttnSimdgroups * 32)
    out[long(t) * args.num_heads * hd + (g * group + e / hd) * hd + e % hd] = A(res_out[e]);
}

template <typename KV, typename A>
kernel void paged_attention_decode(constant PagedAttentionDecodeArgs& args [[buffer(0)]],
                                   device const A* q [[buffer(1)]],                  // [num_tokens, q_stride]
                                   device const A* k [[buffer(2)]],                  // [num_tokens, k_stride]
                                   device const A* v [[buffer(3)]],                  // [num_tokens, v_stride]
                                   device const long* slot_mapping [[buffer(4)]],    // [num_tokens]
                                   device KV* k_cache [[buffer(5)]],                 // [blocks, block_size, kv_heads, hd]
                                   device KV* v_cache [[buffer(6)]],
                                   device const int* block_tables [[buffer(7)]],     // [num_seqs, block_table_width]
                                   device const int* query_start_loc [[buffer(8)]],  // [num_seqs + 1]
                                   device const int* seq_lens [[buffer(9)]],         // [num_seqs]
                                   device A* out [[buffer(10)]],                     // [num_tokens, num_heads * hd]
                                   uint3 tg [[threadgroup_position_in_grid]],
                                   uint tid [[thread_index_in_threadgroup]],
                                   uint lane [[thread_index_in_simdgroup]],
                                   uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float sg_max[kAttnSimdgroups * kMaxGroup];
  threadgroup float sg_sum[kAttnSimdgroups * kMaxGroup];
  threadgroup float sg_out[kAttnSimdgroups * kMaxGroupDims];
  threadgroup float res_max[kMaxGroup];
  threadgroup float res_sum[kMaxGroup];
  threadgroup float res_out[kMaxGroupDims];
  constant PagedAttentionArgs& a = args.attn;
  const int t = int(tg.x), g = int(tg.y), hd = a.head_dim, group = a.num_heads / a.num_kv_heads;
  const long slot = slot_mapping[t];
  if (slot >= 0 && slot < long(args.num_slots)) {  // this KV head of the new token, into its slot
    const long base = slot * long(a.num_kv_heads) * hd + long(g) * hd;
    for (int d = int(tid); d < hd; d += kAttnSimdgroups * 32) {
      k_cache[base + d] = KV(float(k[long(t) * args.k_stride + g * hd + d]));
      v_cache[base + d] = KV(float(v[long(t) * args.v_stride + g * hd + d]));
    }
  }
  threadgroup_barrier(mem_flags::mem_device);  // the whole threadgroup sees the new key and value
  const RowInfo r = row_info(a, query_start_loc, seq_lens, t);
  device const int* bt = block_tables + long(r.seq) * a.block_table_width;
  if (kWideHeads)
    attend_range<KV, A, 8, 4>(a, q, k_cache, v_cache, bt, t, g, r.first, r.pos, sg_max, sg_sum, sg_out, res_max,
                              res_sum, res_out, tid, lane, sg);
  else
    attend_range<KV, A, 4, 8>(a, q, k_cache, v_cache, bt, t, g, r.first, r.pos, sg_max, sg_sum, sg_out, res_max,
                              res_sum, res_out, tid, lane, sg);
  for (int e = int(tid); e < group * hd; e += kAttnSimdgroups * 32)
    out[long(t) * a.num_heads * hd + (g * group + e / hd) * hd + e % hd] = A(res_out[e]);
}

template <typename KV, typename A>
kernel void paged_attention_split(constant PagedAttentionSplitArgs& args [[buffer(0)]],
                                  device const A* q [[buffer(1)]],
                                  device const KV* k_cache [[buffer(2)]],
                                  device const KV* v_cache [[buffer(3)]],
                                  device const int* block_tables [[buffer(4)]],
                                  device const int* query_start_loc [[buffer(5)]],
                                  device const int* seq_lens [[buffer(6)]],
                                  device float* part_max [[buffer(7)]],  // [num_tokens, num_heads, max_partitions]
                                  device float* part_sum [[buffer(8)]],  // [num_tokens, num_heads, max_partitions]
                                  device float* part_out [[buffer(9)]],  // [.., max_partitions, head_dim]
                                  uint3 tg [[threadgroup_position_in_grid]],
                                  uint tid [[thread_index_in_threadgroup]],
                                  uint lane [[thread_index_in_simdgroup]],
                                  uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float sg_max[kAttnSimdgroups * kMaxGroup];
  threadgroup float sg_sum[kAttnSimdgroups * kMaxGroup];
  threadgroup float sg_out[kAttnSimdgroups * kMaxGroupDims];
  threadgroup float res_max[kMaxGroup];
  threadgroup float res_sum[kMaxGroup];
  threadgroup float res_out[kMaxGroupDims];
  constant PagedAttentionArgs& a = args.attn;
  const int t = int(tg.x), g = int(tg.y), p = int(tg.z), hd = a.head_dim, group = a.num_heads / a.num_kv_heads;
  const RowInfo r = row_info(a, query_start_loc, seq_lens, t);
  device const int* bt = block_tables + long(r.seq) * a.block_table_width;
  const int begin = r.first + p * args.partition_size;
  const int end = min(r.pos, begin + args.partition_size - 1);  // empty when begin > end
  if (kWideHeads)
    attend_range<KV, A, 8, 4>(a, q, k_cache, v_cache, bt, t, g, begin, end, sg_max, sg_sum, sg_out, res_max,
                              res_sum, res_out, tid, lane, sg);
  else
    attend_range<KV, A, 4, 8>(a, q, k_cache, v_cache, bt, t, g, begin, end, sg_max, sg_sum, sg_out, res_max,
                              res_sum, res_out, tid, lane, sg);
  for (int e = int(tid); e < group * hd; e += kAttnSimdgroups * 32) {
    const int h = e / hd, d = e % hd;
    const long row = (long(t) * a.num_heads + g * group + h) * args.max_partitions + p;
    part_out[row * hd + d] = res_out[e];
    if (d == 0) {
      part_max[row] = res_max[h];
      part_sum[row] = res_sum[h];
    }
  }
}

template <typename A>
kernel void paged_attention_reduce(constant PagedAttentionReduceArgs& args [[buffer(0)]],
                                   device const float* part_max [[buffer(1)]],
                                   device const float* part_sum [[buffer(2)]],
                                   device const float* part_out [[buffer(3)]],
                                   device A* out [[buffer(4)]],      // [num_tokens, num_heads * head_dim]
                                   uint3 tg [[threadgroup_position_in_grid]],
                                   uint tid [[thread_position_in_threadgroup]],
                                   uint ntg [[threads_per_threadgroup]]) {
  const int t = int(tg.x), h = int(tg.y), hd = args.head_dim, P = args.max_partitions;
  const long row = (long(t) * args.num_heads + h) * P;
  float mx = -INFINITY;
  for (int p = 0; p < P; ++p) mx = max(mx, part_max[row + p]);
  for (int d = int(tid); d < hd; d += int(ntg)) {
    float num = 0.0f, den = 0.0f;
    for (int p = 0; p < P; ++p) {
      const float w = part_sum[row + p] > 0.0f ? part_sum[row + p] * exp(part_max[row + p] - mx) : 0.0f;
      num += part_out[(row + p) * hd + d] * w;
      den += w;
    }
    out[(long(t) * args.num_heads + h) * hd + d] = A(num / den);
  }
}

// <kvdt>: f32 activations (q, k, v, out); <kvdt>_act_<adt>: activations in the 16-bit type of the cache
template [[host_name("paged_attention_f32")]] kernel decltype(paged_attention<float, float>) paged_attention<float, float>;
template [[host_name("paged_attention_f16")]] kernel decltype(paged_attention<half, float>) paged_attention<half, float>;
template [[host_name("paged_attention_bf16")]] kernel decltype(paged_attention<bfloat, float>) paged_attention<bfloat, float>;
template [[host_name("paged_attention_f16_act_f16")]] kernel decltype(paged_attention<half, half>) paged_attention<half, half>;
template [[host_name("paged_attention_bf16_act_bf16")]] kernel decltype(paged_attention<bfloat, bfloat>) paged_attention<bfloat, bfloat>;
template [[host_name("paged_attention_split_f32")]] kernel decltype(paged_attention_split<float, float>) paged_attention_split<float, float>;
template [[host_name("paged_attention_split_f16")]] kernel decltype(paged_attention_split<half, float>) paged_attention_split<half, float>;
template [[host_name("paged_attention_split_bf16")]] kernel decltype(paged_attention_split<bfloat, float>) paged_attention_split<bfloat, float>;
template [[host_name("paged_attention_split_f16_act_f16")]] kernel decltype(paged_attention_split<half, half>) paged_attention_split<half, half>;
template [[host_name("paged_attention_split_bf16_act_bf16")]] kernel decltype(paged_attention_split<bfloat, bfloat>) paged_attention_split<bfloat, bfloat>;
template [[host_name("paged_attention_decode_f32")]] kernel decltype(paged_attention_decode<float, float>) paged_attention_decode<float, float>;
template [[host_name("paged_attention_decode_f16")]] kernel decltype(paged_attention_decode<half, float>) paged_attention_decode<half, float>;
template [[host_name("paged_attention_decode_bf16")]] kernel decltype(paged_attention_decode<bfloat, float>) paged_attention_decode<bfloat, float>;
template [[host_name("paged_attention_decode_f16_act_f16")]] kernel decltype(paged_attention_decode<half, half>) paged_attention_decode<half, half>;
template [[host_name("paged_attention_decode_bf16_act_bf16")]] kernel decltype(paged_attention_decode<bfloat, bfloat>) paged_attention_decode<bfloat, bfloat>;
template [[host_name("paged_attention_reduce")]] kernel decltype(paged_attention_reduce<float>) paged_attention_reduce<float>;
template [[host_name("paged_attention_reduce_act_f16")]] kernel decltype(paged_attention_reduce<half>) paged_attention_reduce<half>;
template [[host_name("paged_attention_reduce_act_bf16")]] kernel decltype(paged_attention_reduce<bfloat>) paged_attention_reduce<bfloat>;
