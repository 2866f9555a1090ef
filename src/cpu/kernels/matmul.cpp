// matmul_<wdt>: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), x f32, W in PyTorch [out, in] layout.
// Two paths, by the number of rows m of x (tokens of the step):
//  - GEMV (m <= 3, decode): streams each weight row once, converting to f32 in registers, with
//    software prefetch into L2 4 KiB ahead. Memory-bandwidth bound.
//  - tiles (m >= 4: batched decode and prefill): register tiles of dot products along k (dot_tile), W
//    widened in registers, the next W rows prefetched into L2 while a tile computes; x goes in blocks of
//    32 rows, each meeting the thread's share of W (L2/L3-resident for the default model). Compute bound:
//    ~200 GFLOP/s on 2 cores, 1.1-1.4x OpenBLAS's sgemm on f32-widened W (which it replaced; measured at
//    64, 512 and 2048 rows on the default model's shapes).
#include <algorithm>
#include <utility>

#include "../cpu_kernels.h"

namespace metal_engine::cpu {

namespace {

constexpr int kGemvMaxRows = 3;  // from 4 rows the tiles are faster (measured: 10.4 vs 12.1 ms of matmul a step)

// Decode rows (m <= 3): each thread streams its rows of W front to back (one sequential stream), each
// weight converted to f32 once and used for every row of x. A line at a time, the stream is prefetched
// into L2 kGemvPrefetchBytes ahead, spread over the loop: two threads then read W at the machine's
// streaming bandwidth (a 512 MB read; with the prefetch a step's matmuls go from ~26 to ~29 GB/s).
constexpr int kGemvPrefetchBytes = 4096;

template <int MR, class W>
void gemv_rows(const float* x, int K, const W* w, float* y, int64_t N, int64_t n0, int64_t n1) {
#if ME_AVX2
  constexpr int U = MR == 1 ? 4 : 2;     // independent accumulators per row of x
  constexpr int kLine = 64 / sizeof(W);  // elements of W per cache line
  const int KU = K / (8 * U) * (8 * U);
  const char* end = reinterpret_cast<const char*>(w + n1 * K);
  for (int64_t n = n0; n < n1; ++n) {
    const W* wr = w + n * K;
    __m256 acc[MR][U];
    for (int r = 0; r < MR; ++r)
      for (int u = 0; u < U; ++u) acc[r][u] = _mm256_setzero_ps();
    for (int k = 0; k < KU; k += 8 * U) {
      for (int e = k; e < k + 8 * U; e += kLine) {
        const char* p = reinterpret_cast<const char*>(wr + e) + kGemvPrefetchBytes;
        if (e % kLine == 0 && p < end) _mm_prefetch(p, _MM_HINT_T1);
      }
      for (int u = 0; u < U; ++u) {
        const __m256 wv = load8(wr + k + 8 * u);
        for (int r = 0; r < MR; ++r) acc[r][u] = _mm256_fmadd_ps(wv, load8(x + r * K + k + 8 * u), acc[r][u]);
      }
    }
    for (int r = 0; r < MR; ++r) {
      __m256 s = acc[r][0];
      for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, acc[r][u]);
      y[r * N + n] = hsum(s) + dot(x + r * K + KU, wr + KU, K - KU);
    }
  }
#else
  for (int64_t n = n0; n < n1; ++n)
    for (int r = 0; r < MR; ++r) y[r * N + n] = dot(x + r * K, w + n * K, K);
#endif
}

// Batched decode and prefill (4 rows and more): y tiles of MB rows of x by NB rows of W as dot products along k. x and W
// are both contiguous along k, so nothing is packed or transposed; W's f16/bf16 is widened in registers and
// each W row block is reused from L1 for every row of x. The tile fills the vector registers: with
// AVX-512VL's 32 (still 256-bit vectors) 8 x 3 accumulators + 3 W + 1 x; with AVX2's 16, 6 x 2 + 2 + 1.
#if defined(__AVX512VL__)
constexpr int kTileRows = 8, kTileW = 3;
#else
constexpr int kTileRows = 6, kTileW = 2;
#endif
constexpr int kPrefetchAheadTiles = 3;  // W row blocks ahead of the one being multiplied
constexpr int kRowBlock = 32;           // rows of x per pass over the thread's W rows

// y[r, j] = x[r, :] . w[j, :] for r < MB, j < NB. If prefetch is set, the NB rows of W there are fetched
// towards L2 a line at a time while this tile computes: spread over the loop, the prefetches overlap the
// FMAs (issued in one burst they stall it), and into L2 they do not evict x from L1. Measured on the
// 16-row LM head with cold weights, one thread: 50 GFLOP/s with a burst into L1, 89 spread into L2.
template <int MB, int NB, class W>
inline void dot_tile(const float* x, int K, const W* w, float* y, int64_t N, const W* prefetch) {
#if ME_AVX2
  __m256 acc[MB][NB];
  for (int r = 0; r < MB; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_setzero_ps();
  const int K8 = K / 8 * 8;
  constexpr int kLine = 64 / sizeof(W);  // elements of W per cache line
  for (int k = 0; k < K8; k += 8) {
    __m256 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = load8(w + int64_t(j) * K + k);
    if (prefetch && k % kLine == 0)
      for (int j = 0; j < NB; ++j) __builtin_prefetch(prefetch + int64_t(j) * K + k, 0, 2);
    for (int r = 0; r < MB; ++r) {
      __m256 xv = load8(x + int64_t(r) * K + k);
      __asm__("" : "+v"(xv));  // one load of x per row, not one folded into each of the NB FMAs
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_fmadd_ps(xv, wv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < MB; ++r)
    for (int j = 0; j < NB; ++j)
      y[r * N + j] = hsum(acc[r][j]) + dot(x + int64_t(r) * K + K8, w + int64_t(j) * K + K8, K - K8);
#else
  (void)prefetch;
  for (int r = 0; r < MB; ++r)
    for (int j = 0; j < NB; ++j) y[r * N + j] = dot(x + int64_t(r) * K, w + int64_t(j) * K, K);
#endif
}

// All M rows of x against NB rows of W: full tiles of kTileRows rows, then one tile of the rest.
template <int NB, class W, int... Rest>
void dot_rows(const float* x, int M, int K, const W* w, float* y, int64_t N, const W* prefetch,
              std::integer_sequence<int, Rest...>) {
  int m = 0;
  for (; m + kTileRows <= M; m += kTileRows, prefetch = nullptr)
    dot_tile<kTileRows, NB>(x + int64_t(m) * K, K, w, y + m * N, N, prefetch);
  const int rest = M - m;
  ((rest == Rest + 1 ? dot_tile<Rest + 1, NB>(x + int64_t(m) * K, K, w, y + m * N, N, prefetch) : void()), ...);
}

template <int NB, class W>
void dot_rows(const float* x, int M, int K, const W* w, float* y, int64_t N, const W* prefetch) {
  dot_rows<NB>(x, M, K, w, y, N, prefetch, std::make_integer_sequence<int, kTileRows - 1>{});
}

// y[:, n0:n1] for up to kRowBlock rows of x: blocks of kTileW rows of W, then one block of the rest.
template <class W, int... Rest>
void gemm_tiles(const float* x, int M, int K, const W* w, float* y, int N, int64_t n0, int64_t n1,
                std::integer_sequence<int, Rest...>) {
  int64_t n = n0;
  for (; n + kTileW <= n1; n += kTileW) {
    const int64_t ahead = n + kPrefetchAheadTiles * kTileW;
    dot_rows<kTileW>(x, M, K, w + n * K, y + n, N, ahead + kTileW <= n1 ? w + ahead * K : nullptr);
  }
  const int rest = int(n1 - n);
  ((rest == Rest + 1 ? dot_rows<Rest + 1>(x, M, K, w + n * K, y + n, N, static_cast<const W*>(nullptr)) : void()),
   ...);
}

template <class W>
void gemm_tiles(const float* x, int M, int K, const W* w, float* y, int N, int64_t n0, int64_t n1) {
  gemm_tiles(x, M, K, w, y, N, n0, n1, std::make_integer_sequence<int, kTileW - 1>{});
}

template <class W>
void gemv(const float* x, int M, int K, const W* w, float* y, int N, int64_t n0, int64_t n1) {
  switch (M) {
    case 1: gemv_rows<1>(x, K, w, y, N, n0, n1); break;
    case 2: gemv_rows<2>(x, K, w, y, N, n0, n1); break;
    default: gemv_rows<3>(x, K, w, y, N, n0, n1); break;
  }
  static_assert(kGemvMaxRows == 3, "gemv() dispatches 1 to 3 rows");
}

template <class W>
void matmul(const MatmulArgs& a, void* const* b, ThreadPool& pool) {
  const float* x = static_cast<const float*>(b[0]);  // [m, k]
  const W* w = static_cast<const W*>(b[1]);          // [n, k]
  const W* bias = static_cast<const W*>(b[2]);       // [n] or null
  float* y = static_cast<float*>(b[3]);              // [m, n]
  const int M = a.m, N = a.n, K = a.k;
  if (M <= kGemvMaxRows) {
    pool.parallel_for(N, [&](int64_t n0, int64_t n1) { gemv(x, M, K, w, y, N, n0, n1); });
  } else {
    // Blocks of kTileW rows of W split evenly over the threads; x in blocks of kRowBlock rows, each meeting
    // all of the thread's W rows, which stay in L2/L3 between blocks.
    pool.parallel_for((N + kTileW - 1) / kTileW, [&](int64_t b0, int64_t b1) {
      for (int m0 = 0; m0 < M; m0 += kRowBlock)
        gemm_tiles(x + int64_t(m0) * K, std::min(kRowBlock, M - m0), K, w, y + int64_t(m0) * N, N, b0 * kTileW,
                   std::min<int64_t>(N, b1 * kTileW));
    });
  }
  if (a.has_bias && bias) {
    for (int m = 0; m < M; ++m) {
      float* yr = y + int64_t(m) * N;
      for (int n = 0; n < N; ++n) yr[n] += to_float(bias[n]);
    }
  }
}

}  // namespace

void add_matmul_kernels(std::vector<KernelDef>& table) {
  table.push_back(make_kernel<MatmulArgs>("matmul_f32", 4, matmul<float>));
  table.push_back(make_kernel<MatmulArgs>("matmul_f16", 4, matmul<f16>));
  table.push_back(make_kernel<MatmulArgs>("matmul_bf16", 4, matmul<bf16>));
}

}  // namespace metal_engine::cpu
