// y = x W^T on one thread, in register tiles of dot products along k: the cpu backend's GEMM (matmul for
// 4+ rows; prefill attention's short-k S = Q K^T stays on the BLAS, measured 1.3x faster there).
// x [M, K] f32 and W [N, K] f32/f16/bf16 are both contiguous along k, so nothing is packed or transposed;
// W's f16/bf16 is widened in registers and each W row block is reused from L1 for every row of x. The tile fills the vector registers: with
// AVX-512VL's 32 (still 256-bit vectors) 8 x 3 accumulators + 3 W + 1 x; with AVX2's 16, 6 x 2 + 2 + 1.
#pragma once
#include <cstdint>
#include <utility>

#include "simd.h"

namespace metal_engine::cpu {

#if defined(__AVX512VL__) || ME_NEON  // 32 vector registers (NEON's are 128-bit)
constexpr int kTileRows = 8, kTileW = 3;
#else
constexpr int kTileRows = 6, kTileW = 2;
#endif
constexpr int kPrefetchAheadTiles = 3;  // W row blocks ahead of the one being multiplied

// Leading dimensions (elements between rows) of the three matrices.
struct GemmStrides {
  int64_t x, w, y;
};

namespace tiles {

// y[r, j] = x[r, :K] . w[j, :K] for r < MB, j < NB. If prefetch is set, the NB rows of W there are fetched
// towards L2 a line at a time while this tile computes: spread over the loop, the prefetches overlap the
// FMAs (issued in one burst they stall it), and into L2 they do not evict x from L1. Measured on the
// 16-row LM head with cold weights, one thread: 50 GFLOP/s with a burst into L1, 89 spread into L2.
template <int MB, int NB, class W>
inline void dot_tile(const float* x, const W* w, float* y, int K, GemmStrides ld, const W* prefetch) {
#if ME_AVX2
  __m256 acc[MB][NB];
  for (int r = 0; r < MB; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_setzero_ps();
  const int K8 = K / 8 * 8;
  constexpr int kLine = 64 / sizeof(W);  // elements of W per cache line
  for (int k = 0; k < K8; k += 8) {
    __m256 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = load8(w + j * ld.w + k);
    if (prefetch && k % kLine == 0)
      for (int j = 0; j < NB; ++j) __builtin_prefetch(prefetch + j * ld.w + k, 0, 2);
    for (int r = 0; r < MB; ++r) {
      __m256 xv = load8(x + r * ld.x + k);
      __asm__("" : "+v"(xv));  // one load of x per row, not one folded into each of the NB FMAs
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_fmadd_ps(xv, wv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < MB; ++r)
    for (int j = 0; j < NB; ++j)
      y[r * ld.y + j] = hsum(acc[r][j]) + dot(x + r * ld.x + K8, w + j * ld.w + K8, K - K8);
#elif ME_NEON
  float32x4_t acc[MB][NB];
  for (int r = 0; r < MB; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = vdupq_n_f32(0.f);
  const int K4 = K / 4 * 4;
  constexpr int kLine = 64 / sizeof(W);
  for (int k = 0; k < K4; k += 4) {
    float32x4_t wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = load4(w + j * ld.w + k);
    if (prefetch && k % kLine == 0)
      for (int j = 0; j < NB; ++j) __builtin_prefetch(prefetch + j * ld.w + k, 0, 2);
    for (int r = 0; r < MB; ++r) {
      const float32x4_t xv = vld1q_f32(x + r * ld.x + k);
      for (int j = 0; j < NB; ++j) acc[r][j] = vfmaq_f32(acc[r][j], xv, wv[j]);
    }
  }
  for (int r = 0; r < MB; ++r)
    for (int j = 0; j < NB; ++j)
      y[r * ld.y + j] = vaddvq_f32(acc[r][j]) + dot(x + r * ld.x + K4, w + j * ld.w + K4, K - K4);
#else
  (void)prefetch;
  for (int r = 0; r < MB; ++r)
    for (int j = 0; j < NB; ++j) y[r * ld.y + j] = dot(x + r * ld.x, w + j * ld.w, K);
#endif
}

// All M rows of x against NB rows of W: full tiles of kTileRows rows, then one tile of the rest.
template <int NB, class W, int... Rest>
inline void dot_rows(const float* x, int M, const W* w, float* y, int K, GemmStrides ld, const W* prefetch,
                     std::integer_sequence<int, Rest...>) {
  int m = 0;
  for (; m + kTileRows <= M; m += kTileRows, prefetch = nullptr)
    dot_tile<kTileRows, NB>(x + m * ld.x, w, y + m * ld.y, K, ld, prefetch);
  const int rest = M - m;
  ((rest == Rest + 1 ? dot_tile<Rest + 1, NB>(x + m * ld.x, w, y + m * ld.y, K, ld, prefetch) : void()), ...);
}

template <class W, int... Rest>
inline void gemm(const float* x, int M, const W* w, float* y, int K, GemmStrides ld, int64_t n0, int64_t n1,
                 std::integer_sequence<int, Rest...>) {
  constexpr auto rows = std::make_integer_sequence<int, kTileRows - 1>{};
  int64_t n = n0;
  for (; n + kTileW <= n1; n += kTileW) {
    const int64_t ahead = n + kPrefetchAheadTiles * kTileW;
    dot_rows<kTileW>(x, M, w + n * ld.w, y + n, K, ld, ahead + kTileW <= n1 ? w + ahead * ld.w : nullptr, rows);
  }
  const int rest = int(n1 - n);
  ((rest == Rest + 1 ? dot_rows<Rest + 1>(x, M, w + n * ld.w, y + n, K, ld, static_cast<const W*>(nullptr), rows)
                     : void()),
   ...);
}

}  // namespace tiles

// y[:M, n0:n1] = x[:M, :K] W[n0:n1, :K]^T: blocks of kTileW rows of W (the next ones prefetched while a
// block computes), each against all M rows of x. Keep M * K * 4 bytes of x within L2.
template <class W>
inline void gemm_xwt_tiles(const float* x, int M, const W* w, float* y, int K, GemmStrides ld, int64_t n0,
                           int64_t n1) {
  tiles::gemm(x, M, w, y, K, ld, n0, n1, std::make_integer_sequence<int, kTileW - 1>{});
}

}  // namespace metal_engine::cpu
