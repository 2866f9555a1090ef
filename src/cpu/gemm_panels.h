// y = x W^T for many rows of x (prefill), as outer products on packed panels of W, in 512-bit vectors: the cpu
// backend's GEMM from kPanelMinRows rows where the cores run 512-bit FMAs at twice the 256-bit rate
// (gemm_wide_vectors(); gemm_tiles.h's dot-product tiles serve fewer rows, and all of them elsewhere). Each thread
// packs 32 rows of W at a time, transposed and widened to f32, into a k-major panel P [K][32], then every block
// of 14 rows of x multiplies it: acc[r][v] += broadcast(x[r, k]) * P[k, 16 v : 16 v + 16], y's rows stored as
// whole vectors. No horizontal sums: per k, 2 panel loads and 14 broadcasts feed 28 FMAs in 28 of the 32
// registers, so the loop is FMA-bound, where the dot-product tiles, loading x for every 3 FMAs, gain nothing
// from 512-bit vectors. The panel (K * 128 bytes) stays in L2 while a chunk of x passes it; packing costs a
// pass over W per chunk (~9% of the FMAs' time at 448 rows).
// Measured on the Xeon with AMX here (bench/gemm_width.py, 2 threads, f16 W): 512-2048 rows 266-286 GFLOP/s
// against the tiles' 170-184 (1.45-1.7x; a 512-token prefill 1.3x); 256-bit panels were slower than the tiles.
#pragma once
#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "gemm_tiles.h"
#include "simd.h"

namespace metal_engine::cpu {

// Rows of x from which the panels beat the dot-product tiles, measured (bench/gemm_width.py, f16 W, 2 threads): at
// 64 rows 0.76-0.83x (packing a panel costs what 64 rows of it compute), 192 rows 0.94-1.27x, 256 rows 1.09-1.39x.
constexpr int kPanelMinRows = 256;

#if ME_AVX2 && defined(__AVX512F__)
#define ME_GEMM512 1  // this build has the 512-bit panels
#endif
constexpr int kPanelCols = 32;  // columns of y (rows of W) a panel covers: give each call whole panels
constexpr int kPanelRows = 14;  // rows of x a block multiplies

// Rows of x (K long) to hand gemm_xwt_panels at a time, of M: chunks of at most ~1.5 MiB, so that they stay in L2
// while the panels pass (each chunk packs every panel again), split evenly (M = 512, K = 1536: 256 + 256, not
// 170 + 170 + 170 + 2).
inline int panel_row_chunk(int K, int M) {
  const int most = std::max(4 * kPanelRows, int((3 << 19) / (int64_t(std::max(K, 1)) * 4)));
  const int chunks = (M + most - 1) / most;
  return std::max(1, (M + chunks - 1) / chunks);
}

// Whether matmul runs the 512-bit panels from kPanelMinRows rows (machine_probes.cpp): METAL_ENGINE_CPU_GEMM_BITS=256
// (the dot-product tiles only) or 512 forces it; otherwise the first call measures both FMA rates on one core
// and takes the panels if 512-bit FMAs run 1.4x the flops (Intel's cores with two 512-bit FMA units; Zen 4 splits
// a 512-bit FMA in two, so there the tiles stay).
bool gemm_wide_vectors();

#if ME_GEMM512
namespace panels {

struct V512 {
  using V = __m512;
  static constexpr int L = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V bcast(const float* p) { return _mm512_set1_ps(*p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
};

constexpr int kMR = kPanelRows;  // 28 accumulators + 2 panel vectors + 1 broadcast of 32 registers
constexpr int kNR = kPanelCols;  // two vectors

// y[:MR, :cols] = x[:MR, :K] P (P: [K][2 L]); cols < 2 L stores only those columns. Not inlined: inlined
// into gemm() below (its thirteen remainder instantiations beside it), GCC 12 allocated its registers worse and
// it ran at half the speed (measured 48 against 97 GFLOP/s on one core).
template <int MR, class T>
__attribute__((noinline)) void panel_block(const float* x, int64_t ldx, const float* P, int K, float* y, int64_t ldy,
                                           int cols) {
  using V = typename T::V;
  constexpr int L = T::L;
  V acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = T::zero();
  for (int k = 0; k < K; ++k) {
    const V w0 = T::load(P + int64_t(k) * 2 * L), w1 = T::load(P + int64_t(k) * 2 * L + L);
    for (int r = 0; r < MR; ++r) {
      const V xb = T::bcast(x + r * ldx + k);
      acc[r][0] = T::fma(xb, w0, acc[r][0]);
      acc[r][1] = T::fma(xb, w1, acc[r][1]);
    }
  }
  if (cols == 2 * L) {
    for (int r = 0; r < MR; ++r) {
      T::store(y + r * ldy, acc[r][0]);
      T::store(y + r * ldy + L, acc[r][1]);
    }
    return;
  }
  alignas(64) float tmp[2 * L];
  for (int r = 0; r < MR; ++r) {
    T::store(tmp, acc[r][0]);
    T::store(tmp + L, acc[r][1]);
    std::copy(tmp, tmp + cols, y + r * ldy);
  }
}

// P [K][NR] = W[n0:n0+rows, :K]^T in f32, columns past `rows` zero. In chunks of kPackK columns of W: the
// chunk's rows widened into `tmp` [NR][kPackK] (L1), then written out k-major, P's lines each filled at once.
constexpr int kPackK = 64;
template <class W>
inline void pack_panel(const W* w, int64_t ldw, int rows, int K, int NR, float* P, std::vector<float>& tmp) {
  tmp.resize(size_t(NR) * kPackK);
  if (rows < NR) std::fill(tmp.begin(), tmp.end(), 0.f);
  for (int k0 = 0; k0 < K; k0 += kPackK) {
    const int kn = std::min(kPackK, K - k0);
    for (int j = 0; j < rows; ++j) {
      const W* src = w + j * ldw + k0;
      float* dst = tmp.data() + j * kPackK;
      int k = 0;
      for (; k + 8 <= kn; k += 8) store8(dst + k, load8(src + k));  // widened a vector at a time
      for (; k < kn; ++k) dst[k] = to_float(src[k]);
    }
    for (int k = 0; k < kn; ++k) {
      float* out = P + int64_t(k0 + k) * NR;
      for (int j = 0; j < NR; ++j) out[j] = tmp[size_t(j) * kPackK + k];
    }
  }
}

template <class T, class W, int... Rest>
inline void gemm(const float* x, int M, const W* w, float* y, int K, GemmStrides ld, int64_t n0, int64_t n1,
                 std::integer_sequence<int, Rest...>) {
  constexpr int NR = 2 * T::L;
  static_assert(NR == kNR);
  thread_local std::vector<float> panel, tmp;
  panel.resize(size_t(K) * NR);
  for (int64_t n = n0; n < n1; n += NR) {
    const int cols = int(std::min<int64_t>(NR, n1 - n));
    pack_panel(w + n * ld.w, ld.w, cols, K, NR, panel.data(), tmp);
    int m = 0;
    for (; m + kMR <= M; m += kMR)
      panel_block<kMR, T>(x + m * ld.x, ld.x, panel.data(), K, y + m * ld.y + n, ld.y, cols);
    const int rest = M - m;
    ((rest == Rest + 1 ? panel_block<Rest + 1, T>(x + m * ld.x, ld.x, panel.data(), K, y + m * ld.y + n, ld.y, cols)
                       : void()),
     ...);
  }
}

}  // namespace panels

// y[:M, n0:n1] = x[:M, :K] W[n0:n1, :K]^T through packed panels. Keep M * K * 4 bytes of x within L2; give each
// call whole panels of W (n0 a multiple of kNR) so that none is packed twice.
template <class W>
inline void gemm_xwt_panels(const float* x, int M, const W* w, float* y, int K, GemmStrides ld, int64_t n0,
                            int64_t n1) {
  panels::gemm<panels::V512>(x, M, w, y, K, ld, n0, n1, std::make_integer_sequence<int, panels::kMR - 1>{});
}
#endif

}  // namespace metal_engine::cpu
