// matmul_<wdt>: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), x f32, W in PyTorch [out, in] layout.
// Two paths, by the number of rows m of x (tokens of the step):
//  - GEMV (m <= 3, decode): streams each weight row once, converting to f32 in registers, with
//    software prefetch into L2 4 KiB ahead. Memory-bandwidth bound.
//  - tiles (m >= 4: batched decode and prefill, gemm_tiles.h): register tiles of dot products along k, W
//    widened in registers, the next W rows prefetched into L2 while a tile computes; x goes in blocks of
//    32 rows, each meeting the thread's share of W (L2/L3-resident for the default model). Compute bound:
//    ~200 GFLOP/s on 2 cores, 1.1-1.4x OpenBLAS's sgemm on f32-widened W (which it replaced; measured at
//    64, 512 and 2048 rows on the default model's shapes). On macOS, prefill (33+ rows) keeps Accelerate's
//    sgemm (gemm_blas), which runs on Apple Silicon's AMX units.
//  - AMX-BF16 (f16 / bf16 W from kAmxBf16MinRows rows, where the CPU has Intel's AMX: gemm_amx.h): x and W each
//    split into two bf16 (16 significand bits), three tile products per 32 k accumulated in f32 (bf16 W: two).
#include <algorithm>
#include <type_traits>
#include <vector>

#include "../blas.h"
#include "../cpu_kernels.h"
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 headers make their "undefined" placeholder vectors from themselves (`__m512 __Y = __Y;`), which
// -Wall reports at every inlined use (gemm_amx.h's masked loads).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include "../gemm_amx.h"
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#include "../gemm_panels.h"
#include "../gemm_tiles.h"

namespace metal_engine::cpu {

namespace {

constexpr int kGemvMaxRows = 3;  // from 4 rows the tiles are faster (measured: 10.4 vs 12.1 ms of matmul a step)

// Decode rows (m <= 3): each thread streams its rows of W front to back (one sequential stream), each
// weight converted to f32 once and used for every row of x. A line at a time, the stream is prefetched
// into L2 kGemvPrefetchBytes ahead, spread over the loop: two threads then read W at about the machine's
// streaming bandwidth (a batch-1 step's matmuls: ~26 GB/s with whole rows prefetched into L1, ~29 so).
constexpr int kGemvPrefetchBytes = 4096;

template <int MR, class W>
void gemv_rows(const float* x, int K, const W* w, float* y, int64_t N, int64_t n0, int64_t n1) {  // N: y's row stride
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

// y[:, n0:n1] = x @ W[n0:n1]^T through the BLAS (where blas_preferred_for_gemm(): Accelerate); f16/bf16 rows
// are widened in L2-sized slabs.
template <class W>
void gemm_blas(const float* x, int M, int K, const W* w, float* y, int N, int64_t n0, int64_t n1) {
  if constexpr (std::is_same_v<W, float>) {
    blas_sgemm_xwt(M, int(n1 - n0), K, x, K, w + n0 * K, K, y + n0, N);
  } else {
    thread_local std::vector<float> slab;
    const int64_t rows = std::max<int64_t>(16, (256 << 10) / (int64_t(K) * 4));
    slab.resize(size_t(rows) * K);
    for (int64_t r0 = n0; r0 < n1; r0 += rows) {
      const int64_t r1 = std::min(n1, r0 + rows);
      for (int64_t r = r0; r < r1; ++r) convert_to_f32(w + r * K, slab.data() + (r - r0) * K, K);
      blas_sgemm_xwt(M, int(r1 - r0), K, x, K, slab.data(), K, y + r0, N);
    }
  }
}

constexpr int kRowBlock = 32;  // rows of x per pass over the thread's W rows (tiles path)

template <class W>
void gemv(const float* x, int M, int K, const W* w, float* y, int N, int64_t n0, int64_t n1) {
  switch (M) {
    case 1: gemv_rows<1>(x, K, w, y, N, n0, n1); break;
    case 2: gemv_rows<2>(x, K, w, y, N, n0, n1); break;
    default: gemv_rows<3>(x, K, w, y, N, n0, n1); break;
  }
  static_assert(kGemvMaxRows == 3, "gemv() dispatches 1 to 3 rows");
}

// kViaBlas: prefill rows through the BLAS even where the tiles are preferred (matmul_blas_*, so that the
// path macOS takes is tested wherever a BLAS is present).
template <class W, bool kViaBlas = false>
void matmul(const MatmulArgs& a, void* const* b, ThreadPool& pool) {
  const float* x = static_cast<const float*>(b[0]);  // [m, k]
  const W* w = static_cast<const W*>(b[1]);          // [n, k]
  const W* bias = static_cast<const W*>(b[2]);       // [n] or null
  float* y = static_cast<float*>(b[3]);              // [m, n]
  const int M = a.m, N = a.n, K = a.k, LY = a.y_stride;
  if (M <= kGemvMaxRows) {
    pool.parallel_for(N, [&](int64_t n0, int64_t n1) { gemv(x, M, K, w, y, LY, n0, n1); });
  } else if (M > kRowBlock && (blas_preferred_for_gemm() || kViaBlas)) {
    pool.parallel_for(N, [&](int64_t n0, int64_t n1) { gemm_blas(x, M, K, w, y, LY, n0, n1); });
#if ME_AMX
  } else if (!std::is_same_v<W, float> && M >= kAmxBf16MinRows && amx_tiles()) {
    // 16-bit weights on AMX-BF16 tiles, x and W each split into two bf16 (gemm_amx.h)
    if constexpr (!std::is_same_v<W, float>) amx::matmul_16bit(x, M, K, w, y, N, LY, pool);
#endif
#if ME_GEMM512
  } else if (M >= kPanelMinRows && gemm_wide_vectors()) {
    // Whole panels of W split evenly over the threads; x in chunks of rows that stay in L2 while every panel of
    // the thread's W passes them (each panel packed once per chunk).
    constexpr int64_t pc = kPanelCols;
    const int chunk = panel_row_chunk(K, M);
    pool.parallel_for((N + pc - 1) / pc, [&](int64_t b0, int64_t b1) {
      for (int m0 = 0; m0 < M; m0 += chunk)
        gemm_xwt_panels(x + int64_t(m0) * K, std::min(chunk, M - m0), w, y + int64_t(m0) * LY, K, {K, K, LY},
                        b0 * pc, std::min<int64_t>(N, b1 * pc));
    });
#endif
  } else {
    // Blocks of kTileW rows of W split evenly over the threads; x in blocks of kRowBlock rows, each meeting
    // all of the thread's W rows, which stay in L2/L3 between blocks.
    pool.parallel_for((N + kTileW - 1) / kTileW, [&](int64_t b0, int64_t b1) {
      for (int m0 = 0; m0 < M; m0 += kRowBlock)
        gemm_xwt_tiles(x + int64_t(m0) * K, std::min(kRowBlock, M - m0), w, y + int64_t(m0) * LY, K, {K, K, LY},
                       b0 * kTileW, std::min<int64_t>(N, b1 * kTileW));
    });
  }
  if (a.has_bias && bias) {
    for (int m = 0; m < M; ++m) {
      float* yr = y + int64_t(m) * LY;
      for (int n = 0; n < N; ++n) yr[n] += to_float(bias[n]);
    }
  }
}

}  // namespace

template <class W>
void matmul_rows(const float* x, int M, int K, const W* w, float* y, int N, ThreadPool& pool) {
  const MatmulArgs a{M, N, K, 0, N};
  void* b[4] = {const_cast<float*>(x), const_cast<W*>(w), nullptr, y};
  matmul<W>(a, b, pool);
}
template void matmul_rows<float>(const float*, int, int, const float*, float*, int, ThreadPool&);
template void matmul_rows<f16>(const float*, int, int, const f16*, float*, int, ThreadPool&);
template void matmul_rows<bf16>(const float*, int, int, const bf16*, float*, int, ThreadPool&);

void add_matmul_kernels(std::vector<KernelDef>& table) {
  table.push_back(make_kernel<MatmulArgs>("matmul_f32", 4, matmul<float>));
  table.push_back(make_kernel<MatmulArgs>("matmul_f16", 4, matmul<f16>));
  table.push_back(make_kernel<MatmulArgs>("matmul_bf16", 4, matmul<bf16>));
  if (blas_available()) {
    table.push_back(make_kernel<MatmulArgs>("matmul_blas_f32", 4, matmul<float, true>));
    table.push_back(make_kernel<MatmulArgs>("matmul_blas_f16", 4, matmul<f16, true>));
    table.push_back(make_kernel<MatmulArgs>("matmul_blas_bf16", 4, matmul<bf16, true>));
  }
}

}  // namespace metal_engine::cpu
