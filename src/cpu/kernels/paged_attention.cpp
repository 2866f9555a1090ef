// paged_attention_<kvdt>: causal (optionally sliding-window) GQA attention of every query token over
// its sequence's keys in the paged KV cache. One work item = (query token, kv head): the group's query
// heads share each key and value read. Serves prefill chunks, chunks continuing over cached pages and
// decode rows of one step alike.
#include <algorithm>
#include <limits>
#include <vector>

#include "../cpu_kernels.h"

namespace metal_engine::cpu {

template <class KV>
static void paged_attention(const PagedAttentionArgs& a, void* const* b, ThreadPool& pool) {
  const float* q = static_cast<const float*>(b[0]);               // [num_tokens, q_stride]
  const KV* k_cache = static_cast<const KV*>(b[1]);               // [num_blocks, block_size, kv_heads, hd]
  const KV* v_cache = static_cast<const KV*>(b[2]);
  const int32_t* block_tables = static_cast<const int32_t*>(b[3]);  // [num_seqs, block_table_width]
  const int32_t* qsl = static_cast<const int32_t*>(b[4]);           // [num_seqs + 1]
  const int32_t* seq_lens = static_cast<const int32_t*>(b[5]);      // [num_seqs]
  float* out = static_cast<float*>(b[6]);                           // [num_tokens, num_heads * hd]
  const int hd = a.head_dim, group = a.num_heads / a.num_kv_heads;
  const int64_t num_tokens = qsl[a.num_seqs];
  const int64_t slot_stride = int64_t(a.num_kv_heads) * hd;

  pool.parallel_for_dynamic(num_tokens * a.num_kv_heads, [&](int64_t item, int) {
    const int64_t t = item / a.num_kv_heads;
    const int g = int(item % a.num_kv_heads);
    const int s = int(std::upper_bound(qsl, qsl + a.num_seqs + 1, int32_t(t)) - qsl) - 1;
    const int qlen = qsl[s + 1] - qsl[s];
    const int pos = seq_lens[s] - qlen + int(t - qsl[s]);  // this query's context position
    const int first = a.sliding_window > 0 ? std::max(0, pos - a.sliding_window + 1) : 0;
    const int n = pos - first + 1;
    const int32_t* bt = block_tables + int64_t(s) * a.block_table_width;

    thread_local std::vector<float> scores;
    scores.resize(size_t(group) * size_t(n));
    // scores[h][j] = q_h . k_j * scale
    for (int j = 0; j < n; ++j) {
      const int c = first + j;
      const int64_t slot = int64_t(bt[c / a.block_size]) * a.block_size + c % a.block_size;
      const KV* kj = k_cache + slot * slot_stride + int64_t(g) * hd;
      for (int h = 0; h < group; ++h)
        scores[size_t(h) * n + j] = dot(q + t * a.q_stride + int64_t(g * group + h) * hd, kj, hd) * a.scale;
    }
    // softmax over j, then out_h = sum_j p_j v_j
    for (int h = 0; h < group; ++h) {
      float* sc = scores.data() + size_t(h) * n;
      float mx = -std::numeric_limits<float>::infinity();
      for (int j = 0; j < n; ++j) mx = std::max(mx, sc[j]);
      float sum = 0.f;
      for (int j = 0; j < n; ++j) { sc[j] = std::exp(sc[j] - mx); sum += sc[j]; }
      const float inv = 1.0f / sum;
      float* o = out + t * int64_t(a.num_heads) * hd + int64_t(g * group + h) * hd;
      std::fill(o, o + hd, 0.f);
      for (int j = 0; j < n; ++j) {
        const int c = first + j;
        const int64_t slot = int64_t(bt[c / a.block_size]) * a.block_size + c % a.block_size;
        axpy(sc[j] * inv, v_cache + slot * slot_stride + int64_t(g) * hd, o, hd);
      }
    }
  });
}

void add_paged_attention_kernels(std::vector<KernelDef>& table) {
  table.push_back(make_kernel<PagedAttentionArgs>("paged_attention_f32", 7, paged_attention<float>));
  table.push_back(make_kernel<PagedAttentionArgs>("paged_attention_f16", 7, paged_attention<f16>));
  table.push_back(make_kernel<PagedAttentionArgs>("paged_attention_bf16", 7, paged_attention<bf16>));
}

}  // namespace metal_engine::cpu
