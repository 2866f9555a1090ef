// paged_attention_prefill_<kvdt>: attention for long prefill chunks with simdgroup_matrix (flash-attention
// style). One threadgroup per (16 query rows of one sequence, query head). For each block of 16 keys:
// K to threadgroup memory, S = Q K^T as 2x2 simdgroup_float8x8 tiles, an online softmax per query row
// (causal / sliding-window mask, running max and sum; P overwrites S, O is rescaled), V to threadgroup
// memory, then O += P V tile by tile. Limits: head_dim a multiple of 8, at most 128.
#include <metal_stdlib>
#include <metal_simdgroup_matrix>
#include "op_args.h"
using namespace metal;
using namespace metal_engine;

constant int kRows = 16;  // query rows per threadgroup
constant int kKeys = 16;  // keys per block

template <typename KV, typename A>
kernel void paged_attention_prefill(constant PagedAttentionPrefillArgs& args [[buffer(0)]],
                                    device const A* q [[buffer(1)]],
                                    device const KV* k_cache [[buffer(2)]],
                                    device const KV* v_cache [[buffer(3)]],
                                    device const int* block_tables [[buffer(4)]],
                                    device const int* query_start_loc [[buffer(5)]],
                                    device const int* seq_lens [[buffer(6)]],
                                    device A* out [[buffer(7)]],
                                    uint3 tg [[threadgroup_position_in_grid]],
                                    uint tid [[thread_index_in_threadgroup]],
                                    uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float qs[kRows * 128];   // Q rows [16][hd]
  threadgroup float kvs[kKeys * 128];  // K, then V, of the current key block [16][hd]
  threadgroup float ss[kRows * kKeys]; // scores, then probabilities [16][16]
  threadgroup float os[kRows * 128];   // output accumulator [16][hd]
  threadgroup float row_max[kRows];
  threadgroup float row_sum[kRows];
  threadgroup float row_scale[kRows];
  constant PagedAttentionArgs& a = args.attn;
  const int seq = int(tg.y), h = int(tg.z), hd = a.head_dim;
  const int g = h / (a.num_heads / a.num_kv_heads);
  const int q_begin = query_start_loc[seq], qlen = query_start_loc[seq + 1] - q_begin;
  const int r0 = int(tg.x) * kRows;  // first row of this tile within the sequence's chunk
  if (r0 >= qlen) return;             // the whole threadgroup leaves together, before any barrier
  const int rows = min(kRows, qlen - r0);
  const int ctx = seq_lens[seq];
  const int pos0 = ctx - qlen + r0;   // context position of the tile's first row
  const int pos_last = pos0 + rows - 1;
  const int key_begin = a.sliding_window > 0 ? max(0, pos0 - a.sliding_window + 1) : 0;
  device const int* bt = block_tables + long(seq) * a.block_table_width;
  const long slot_stride = long(a.num_kv_heads) * hd;

  for (int e = int(tid); e < kRows * hd; e += 128) {
    const int r = e / hd, d = e % hd;
    qs[e] = r < rows ? float(q[long(q_begin + r0 + r) * a.q_stride + h * hd + d]) : 0.0f;
    os[e] = 0.0f;
  }
  if (tid < uint(kRows)) {
    row_max[tid] = -INFINITY;
    row_sum[tid] = 0.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  for (int kb = key_begin; kb <= pos_last; kb += kKeys) {
    for (int e = int(tid); e < kKeys * hd; e += 128) {  // K block
      const int c = e / hd, d = e % hd, j = kb + c;
      float v = 0.0f;
      if (j <= pos_last) {
        const long slot = long(bt[j / a.block_size]) * a.block_size + j % a.block_size;
        v = float(k_cache[slot * slot_stride + g * hd + d]);
      }
      kvs[e] = v;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    {  // S = Q K^T: simdgroup sg computes the 8x8 tile (sg / 2, sg % 2)
      const int ti = int(sg) / 2, tj = int(sg) % 2;
      simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      for (int d = 0; d < hd; d += 8) {
        simdgroup_float8x8 qa;
        simdgroup_float8x8 kb8;
        simdgroup_load(qa, qs + ti * 8 * hd + d, hd);
        simdgroup_load(kb8, kvs + tj * 8 * hd + d, hd, ulong2(0, 0), true);
        simdgroup_multiply_accumulate(acc, qa, kb8, acc);
      }
      simdgroup_store(acc, ss + ti * 8 * kKeys + tj * 8, kKeys);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid < uint(kRows)) {  // online softmax of row tid over this block
      const int r = int(tid), p = pos0 + r;
      const int lo = a.sliding_window > 0 ? max(0, p - a.sliding_window + 1) : 0;
      float m_new = row_max[r];
      for (int c = 0; c < kKeys; ++c) {
        const int j = kb + c;
        float s = ss[r * kKeys + c] * a.scale;
        if (a.softcap > 0.0f) s = a.softcap * precise::tanh(s / a.softcap);
        ss[r * kKeys + c] = s;
        if (r < rows && j >= lo && j <= p) m_new = max(m_new, s);
      }
      float sum = 0.0f;
      for (int c = 0; c < kKeys; ++c) {
        const int j = kb + c;
        const bool ok = r < rows && j >= lo && j <= p && m_new != -INFINITY;
        const float pr = ok ? exp(ss[r * kKeys + c] - m_new) : 0.0f;
        ss[r * kKeys + c] = pr;
        sum += pr;
      }
      const float scale = row_max[r] == -INFINITY ? 0.0f : exp(row_max[r] - m_new);
      row_sum[r] = row_sum[r] * scale + sum;
      row_max[r] = m_new;
      row_scale[r] = scale;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int e = int(tid); e < kKeys * hd; e += 128) {  // V block; rescale O
      const int c = e / hd, d = e % hd, j = kb + c;
      float v = 0.0f;
      if (j <= pos_last) {
        const long slot = long(bt[j / a.block_size]) * a.block_size + j % a.block_size;
        v = float(v_cache[slot * slot_stride + g * hd + d]);
      }
      kvs[e] = v;
      os[e] *= row_scale[e / hd];  // kRows == kKeys: the same index range covers O
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int tile = int(sg); tile < 2 * (hd / 8); tile += 4) {  // O += P V, one 8x8 tile of O at a time
      const int ti = tile % 2, dj = tile / 2;
      simdgroup_float8x8 acc;
      simdgroup_load(acc, os + ti * 8 * hd + dj * 8, hd);
      for (int c = 0; c < kKeys; c += 8) {
        simdgroup_float8x8 pa;
        simdgroup_float8x8 vb;
        simdgroup_load(pa, ss + ti * 8 * kKeys + c, kKeys);
        simdgroup_load(vb, kvs + c * hd + dj * 8, hd);
        simdgroup_multiply_accumulate(acc, pa, vb, acc);
      }
      simdgroup_store(acc, os + ti * 8 * hd + dj * 8, hd);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  for (int e = int(tid); e < rows * hd; e += 128) {
    const int r = e / hd, d = e % hd;
    out[long(q_begin + r0 + r) * a.num_heads * hd + h * hd + d] = A(os[r * hd + d] / row_sum[r]);
  }
}

template [[host_name("paged_attention_prefill_f32")]] kernel decltype(paged_attention_prefill<float, float>) paged_attention_prefill<float, float>;
template [[host_name("paged_attention_prefill_f16")]] kernel decltype(paged_attention_prefill<half, float>) paged_attention_prefill<half, float>;
template [[host_name("paged_attention_prefill_bf16")]] kernel decltype(paged_attention_prefill<bfloat, float>) paged_attention_prefill<bfloat, float>;
template [[host_name("paged_attention_prefill_f16_act_f16")]] kernel decltype(paged_attention_prefill<half, half>) paged_attention_prefill<half, half>;
template [[host_name("paged_attention_prefill_bf16_act_bf16")]] kernel decltype(paged_attention_prefill<bfloat, bfloat>) paged_attention_prefill<bfloat, bfloat>;
