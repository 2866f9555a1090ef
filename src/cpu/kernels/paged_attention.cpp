// paged_attention_<kvdt>: causal (optionally sliding-window) GQA attention of every query token over
// its sequence's keys in the paged KV cache. Serves prefill chunks, chunks continuing over cached pages
// and decode rows of one step alike, in two ways:
//  - rows of long prefill chunks, where a BLAS is present: per (sequence, kv head, 64 queries) the
//    needed keys and values are gathered to f32 once, S = Q K^T and O = P V run as sgemm, and the
//    causal / window mask and softmax are applied to S in between;
//  - every other row: one work item = (query token, kv head), the group's heads sharing each K/V read
//    (attend_row_scores, softmax, attend_row_values).
#include <algorithm>
#include <limits>
#include <vector>

#include "../blas.h"
#include "../cpu_kernels.h"

namespace metal_engine::cpu {

constexpr int kBlasMinQueries = 16;  // a sequence's rows in this step from which the BLAS path pays
constexpr int kQueryChunk = 64;

struct BlasItem {
  int seq, kv_head, row0, row1;  // query rows [row0, row1) of the step, all in sequence `seq`
};

template <class KV>
static void attend_chunk_blas(const PagedAttentionArgs& a, const BlasItem& it, const float* q, const KV* k_cache,
                              const KV* v_cache, const int32_t* block_tables, const int32_t* qsl,
                              const int32_t* seq_lens, float* out) {
  const int hd = a.head_dim, group = a.num_heads / a.num_kv_heads, g = it.kv_head;
  const int qlen = qsl[it.seq + 1] - qsl[it.seq];
  const int pos0 = seq_lens[it.seq] - qlen + (it.row0 - qsl[it.seq]);  // context position of row0
  const int rows = it.row1 - it.row0;
  const int last = pos0 + rows - 1;
  const int first = a.sliding_window > 0 ? std::max(0, pos0 - a.sliding_window + 1) : 0;
  const int n = last - first + 1;  // keys this chunk may see
  const int32_t* bt = block_tables + int64_t(it.seq) * a.block_table_width;
  const int64_t slot_stride = int64_t(a.num_kv_heads) * hd;

  // The group's query heads share the keys: their rows go through one S = Q K^T and one O = P V of
  // group * rows rows (Q gathered head after head, O scattered back), not a pair of small GEMMs per head.
  const int m = group * rows;
  thread_local std::vector<float> kf, vf, qg, sc, og;
  kf.resize(size_t(n) * hd);    // keys   [n, hd]
  vf.resize(size_t(n) * hd);    // values [n, hd]
  qg.resize(size_t(m) * hd);    // queries [group * rows, hd]: head hi's row r at hi * rows + r
  sc.resize(size_t(m) * n);     // scores  [group * rows, n]
  og.resize(size_t(m) * hd);    // outputs [group * rows, hd]
  for (int j = 0; j < n; ++j) {
    const int c = first + j;
    const int64_t at = (int64_t(bt[c / a.block_size]) * a.block_size + c % a.block_size) * slot_stride + int64_t(g) * hd;
    convert_to_f32(k_cache + at, kf.data() + size_t(j) * hd, hd);
    convert_to_f32(v_cache + at, vf.data() + size_t(j) * hd, hd);
  }
  for (int hi = 0; hi < group; ++hi)
    for (int r = 0; r < rows; ++r)
      std::copy_n(q + int64_t(it.row0 + r) * a.q_stride + int64_t(g * group + hi) * hd, hd,
                  qg.data() + (size_t(hi) * rows + r) * hd);
  blas_sgemm_xwt(m, n, hd, qg.data(), hd, kf.data(), hd, sc.data(), n);  // S = Q K^T
  for (int i = 0; i < m; ++i) {  // mask, softmax
    float* sr = sc.data() + size_t(i) * n;
    const int p = pos0 + i % rows;
    const int lo = (a.sliding_window > 0 ? std::max(0, p - a.sliding_window + 1) : 0) - first;
    const int hi = p - first;  // inclusive
    float mx = -std::numeric_limits<float>::infinity();
    float scale = a.scale;
    if (a.softcap > 0.0f) {  // Gemma 2: scores softcap * tanh(s * scale / softcap), then a plain softmax
      for (int j = lo; j <= hi; ++j) sr[j] = a.softcap * std::tanh(sr[j] * a.scale / a.softcap);
      scale = 1.0f;
    }
    for (int j = lo; j <= hi; ++j) mx = std::max(mx, sr[j]);
    const float inv = 1.0f / exp_scaled_sum(sr + lo, hi - lo + 1, scale, mx * scale);
    for (int j = 0; j < lo; ++j) sr[j] = 0.f;
    for (int j = lo; j <= hi; ++j) sr[j] *= inv;
    for (int j = hi + 1; j < n; ++j) sr[j] = 0.f;
  }
  blas_sgemm_xw(m, hd, n, sc.data(), n, vf.data(), hd, og.data(), hd);  // O = P V
  for (int hi = 0; hi < group; ++hi)
    for (int r = 0; r < rows; ++r)
      std::copy_n(og.data() + (size_t(hi) * rows + r) * hd, hd,
                  out + int64_t(it.row0 + r) * a.num_heads * hd + int64_t(g * group + hi) * hd);
}

// One query row against its n keys, for the `group` query heads sharing a kv head (decode rows and short
// chunks). scores[h, j] = q[h] . k_j * scale. With AVX2 and head_dim % 8 == 0, keys go 8 at a time: their
// 8 dot products per head accumulate in 8 vectors reduced to one (hsum8), the 8 keys staying in L1 across
// the group's heads.
template <class KV>
static void attend_row_scores(const float* q, const KV* k_head, const KV* v_head, const int64_t* key_at, int n,
                              int group, int hd, float scale, float* scores) {
  // The keys and values of earlier steps are usually out of cache (a step streams all the weights in
  // between), and the block table scatters a sequence's keys: prefetch the keys 16 ahead, and this
  // block's values for attend_row_values (16 rows over 48 cold keys: ~175 -> ~90 us; 8 ahead ~120).
  constexpr int kKeysAhead = 16;
  const size_t row_bytes = size_t(hd) * sizeof(KV);
  auto prefetch_row = [&](const KV* p, bool into_l1) {
    for (size_t off = 0; off < row_bytes; off += 64) {
      if (into_l1) __builtin_prefetch(reinterpret_cast<const char*>(p) + off, 0, 3);
      else __builtin_prefetch(reinterpret_cast<const char*>(p) + off, 0, 2);
    }
  };
  for (int j = 0; j < std::min(n, kKeysAhead); ++j) prefetch_row(k_head + key_at[j], true);
  int j0 = 0;
#if ME_AVX2
  if (hd % 8 == 0) {
    const __m256 vscale = _mm256_set1_ps(scale);
    for (; j0 + 8 <= n; j0 += 8) {
      const KV* kp[8];
      for (int i = 0; i < 8; ++i) kp[i] = k_head + key_at[j0 + i];
      for (int i = 0; i < 8; ++i) {
        if (j0 + kKeysAhead + i < n) prefetch_row(k_head + key_at[j0 + kKeysAhead + i], true);
        prefetch_row(v_head + key_at[j0 + i], false);
      }
      for (int h = 0; h < group; ++h) {
        const float* qh = q + int64_t(h) * hd;
        __m256 acc[8];
        for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
        for (int d = 0; d < hd; d += 8) {
          const __m256 qv = _mm256_loadu_ps(qh + d);
          for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(load8(kp[i] + d), qv, acc[i]);
        }
        _mm256_storeu_ps(scores + int64_t(h) * n + j0, _mm256_mul_ps(hsum8(acc), vscale));
      }
    }
  }
#endif
  for (int j = j0; j < n; ++j) {
    const KV* kj = k_head + key_at[j];
    prefetch_row(v_head + key_at[j], false);
    for (int h = 0; h < group; ++h) scores[int64_t(h) * n + j] = dot(q + int64_t(h) * hd, kj, hd) * scale;
  }
}

#if ME_AVX2
// o[0 : 8 V] = sum_j p[j] * v_j[d0 : d0 + 8 V], the V vectors of the sum held in registers.
template <int V, class KV>
static void weighted_values(const float* p, const KV* v_head, const int64_t* key_at, int n, int d0, float* o) {
  __m256 acc[V];
  for (int v = 0; v < V; ++v) acc[v] = _mm256_setzero_ps();
  for (int j = 0; j < n; ++j) {
    const KV* vj = v_head + key_at[j] + d0;
    const __m256 pj = _mm256_broadcast_ss(p + j);
    for (int v = 0; v < V; ++v) acc[v] = _mm256_fmadd_ps(pj, load8(vj + 8 * v), acc[v]);
  }
  for (int v = 0; v < V; ++v) _mm256_storeu_ps(o + 8 * v, acc[v]);
}
#endif

// out[h] = sum_j probs[h, j] * v_j for the group's heads.
template <class KV>
static void attend_row_values(const float* probs, const KV* v_head, const int64_t* key_at, int n, int group, int hd,
                              float* out) {
#if ME_AVX2
  if (hd % 8 == 0) {
    for (int h = 0; h < group; ++h) {
      const float* p = probs + int64_t(h) * n;
      float* o = out + int64_t(h) * hd;
      int d0 = 0;
      for (; d0 + 64 <= hd; d0 += 64) weighted_values<8>(p, v_head, key_at, n, d0, o + d0);
      switch ((hd - d0) / 8) {
        case 7: weighted_values<7>(p, v_head, key_at, n, d0, o + d0); break;
        case 6: weighted_values<6>(p, v_head, key_at, n, d0, o + d0); break;
        case 5: weighted_values<5>(p, v_head, key_at, n, d0, o + d0); break;
        case 4: weighted_values<4>(p, v_head, key_at, n, d0, o + d0); break;
        case 3: weighted_values<3>(p, v_head, key_at, n, d0, o + d0); break;
        case 2: weighted_values<2>(p, v_head, key_at, n, d0, o + d0); break;
        case 1: weighted_values<1>(p, v_head, key_at, n, d0, o + d0); break;
        default: break;
      }
    }
    return;
  }
#endif
  thread_local std::vector<float> acc;  // one head's output, summed here and written to out once
  acc.resize(size_t(hd));
  for (int h = 0; h < group; ++h) {
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int j = 0; j < n; ++j) axpy(probs[int64_t(h) * n + j], v_head + key_at[j], acc.data(), hd);
    std::copy(acc.begin(), acc.end(), out + int64_t(h) * hd);
  }
}

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

  // Long prefill chunks through the BLAS; the rows they cover are skipped below.
  std::vector<BlasItem> blas_items;
  std::vector<char> done(blas_available() ? size_t(num_tokens) : 0, 0);
  if (blas_available()) {
    for (int s = 0; s < a.num_seqs; ++s) {
      if (qsl[s + 1] - qsl[s] < kBlasMinQueries) continue;
      for (int r = qsl[s]; r < qsl[s + 1]; r += kQueryChunk) {
        const int r1 = std::min(qsl[s + 1], r + kQueryChunk);
        for (int g = 0; g < a.num_kv_heads; ++g) blas_items.push_back({s, g, r, r1});
        std::fill(done.begin() + r, done.begin() + r1, 1);
      }
    }
    // The biggest chunks (latest positions, most keys) first, for balance.
    std::sort(blas_items.begin(), blas_items.end(), [&](const BlasItem& x, const BlasItem& y) {
      return seq_lens[x.seq] - (qsl[x.seq + 1] - x.row1) > seq_lens[y.seq] - (qsl[y.seq + 1] - y.row1);
    });
    pool.parallel_for_dynamic(int64_t(blas_items.size()), [&](int64_t i, int) {
      attend_chunk_blas(a, blas_items[size_t(i)], q, k_cache, v_cache, block_tables, qsl, seq_lens, out);
    });
  }

  pool.parallel_for_dynamic(num_tokens * a.num_kv_heads, [&](int64_t item, int) {
    const int64_t t = item / a.num_kv_heads;
    if (!done.empty() && done[size_t(t)]) return;
    const int g = int(item % a.num_kv_heads);
    const int s = int(std::upper_bound(qsl, qsl + a.num_seqs + 1, int32_t(t)) - qsl) - 1;
    const int qlen = qsl[s + 1] - qsl[s];
    const int pos = seq_lens[s] - qlen + int(t - qsl[s]);  // this query's context position
    const int first = a.sliding_window > 0 ? std::max(0, pos - a.sliding_window + 1) : 0;
    const int n = pos - first + 1;
    const int32_t* bt = block_tables + int64_t(s) * a.block_table_width;
    thread_local std::vector<int64_t> key_at;  // [n]: offset of the j-th visible key in the cache (one kv head)
    key_at.resize(size_t(n));
    for (int j = 0, c = first; j < n; ++j, ++c)
      key_at[size_t(j)] = (int64_t(bt[c / a.block_size]) * a.block_size + c % a.block_size) * slot_stride;
    const KV* k_head = k_cache + int64_t(g) * hd;  // + key_at[j]: the j-th key of this kv head
    const KV* v_head = v_cache + int64_t(g) * hd;
    const float* q_group = q + t * a.q_stride + int64_t(g * group) * hd;  // [group, hd]
    float* out_group = out + t * int64_t(a.num_heads) * hd + int64_t(g * group) * hd;

    thread_local std::vector<float> scores;
    scores.resize(size_t(group) * size_t(n));  // [group, n]
    attend_row_scores(q_group, k_head, v_head, key_at.data(), n, group, hd, a.scale, scores.data());
    if (a.softcap > 0.0f)  // Gemma 2
      for (float& s : scores) s = a.softcap * std::tanh(s / a.softcap);
    for (int h = 0; h < group; ++h) {  // softmax over the keys
      float* sc = scores.data() + size_t(h) * n;
      float mx = -std::numeric_limits<float>::infinity();
      for (int j = 0; j < n; ++j) mx = std::max(mx, sc[j]);
      const float inv = 1.0f / exp_scaled_sum(sc, n, 1.0f, mx);
      for (int j = 0; j < n; ++j) sc[j] *= inv;
    }
    attend_row_values(scores.data(), v_head, key_at.data(), n, group, hd, out_group);
  });
}

void add_paged_attention_kernels(std::vector<KernelDef>& table) {
  table.push_back(make_kernel<PagedAttentionArgs>("paged_attention_f32", 7, paged_attention<float>));
  table.push_back(make_kernel<PagedAttentionArgs>("paged_attention_f16", 7, paged_attention<f16>));
  table.push_back(make_kernel<PagedAttentionArgs>("paged_attention_bf16", 7, paged_attention<bf16>));
}

}  // namespace metal_engine::cpu
