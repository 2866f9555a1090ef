// matmul_<wdt>: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), x f32, W in PyTorch [out, in] layout.
// Three paths:
//  - GEMV (m <= 3, decode): streams each weight row once, converting to f32 in registers, with
//    software prefetch into L2 4 KiB ahead. Memory-bandwidth bound.
//  - small GEMM (4 <= m <= 32, batched decode): register tiles of dot products along k (dot_tile),
//    W widened in registers, the next W rows prefetched into L2 while a tile computes. Compute bound.
//  - GEMM (prefill): with a BLAS (blas.h), each thread hands its share of W's rows to a
//    single-threaded sgemm, converting f16/bf16 rows to f32 a slab at a time; without one, W is
//    packed per 16-column panel and K block into f32 [KC][16] and a 6x16 register-tile micro-kernel
//    (12 accumulators) runs over the rows of x.
#include <algorithm>
#include <utility>
#include <type_traits>
#include <vector>

#include "../blas.h"
#include "../cpu_kernels.h"

namespace metal_engine::cpu {

namespace {

constexpr int kGemvMaxRows = 3;  // from 4 rows the small GEMM's tiles are faster (measured: 10.4 vs 12.1 ms a step at 4)
constexpr int kSmallGemmMaxRows = 32;  // up to here dot-product blocks beat packing (and the BLAS)
constexpr int NR = 16;   // panel width (columns of y / rows of W)
constexpr int MR = 6;    // rows of x per micro-kernel call
constexpr int KC = 256;  // K block: a packed panel block is 16 KiB, L1-resident

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

// Batched decode (4 to 32 rows): y tiles of MB rows of x by NB rows of W as dot products along k. x and W
// are both contiguous along k, so nothing is packed or transposed; W's f16/bf16 is widened in registers and
// each W row block is reused from L1 for every row of x. The tile fills the vector registers: with
// AVX-512VL's 32 (still 256-bit vectors) 8 x 3 accumulators + 3 W + 1 x; with AVX2's 16, 6 x 2 + 2 + 1.
#if defined(__AVX512VL__)
constexpr int kTileRows = 8, kTileW = 3;
#else
constexpr int kTileRows = 6, kTileW = 2;
#endif
constexpr int kPrefetchAheadTiles = 3;  // W row blocks ahead of the one being multiplied

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

// y[:, n0:n1] for 4 to 32 rows of x: blocks of kTileW rows of W, then one block of the rest.
template <class W, int... Rest>
void gemm_small(const float* x, int M, int K, const W* w, float* y, int N, int64_t n0, int64_t n1,
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
void gemm_small(const float* x, int M, int K, const W* w, float* y, int N, int64_t n0, int64_t n1) {
  gemm_small(x, M, K, w, y, N, n0, n1, std::make_integer_sequence<int, kTileW - 1>{});
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

// Packs W[n0 : n0 + nvalid, k0 : k0 + kc] into bp[k][j] (f32, zero columns past nvalid).
template <class W>
void pack_panel(const W* w, int K, int64_t n0, int nvalid, int k0, int kc, float* bp, float* row) {
  for (int j = 0; j < NR; ++j) {
    if (j < nvalid) {
      convert_to_f32(w + (n0 + j) * K + k0, row, kc);
      for (int k = 0; k < kc; ++k) bp[k * NR + j] = row[k];
    } else {
      for (int k = 0; k < kc; ++k) bp[k * NR + j] = 0.f;
    }
  }
}

// c[r, 0:nvalid] (+)= sum_k x[r, k] * bp[k, :] for r < mr.
template <int mr>
void micro_kernel(const float* x, int64_t lda, const float* bp, int kc, float* c, int64_t ldc, int nvalid,
                  bool accumulate) {
#if ME_AVX2
  __m256 c0[mr], c1[mr];
  for (int r = 0; r < mr; ++r) c0[r] = c1[r] = _mm256_setzero_ps();
  for (int k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(bp + k * NR), b1 = _mm256_loadu_ps(bp + k * NR + 8);
    for (int r = 0; r < mr; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * lda + k);
      c0[r] = _mm256_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(a, b1, c1[r]);
    }
  }
  for (int r = 0; r < mr; ++r) {
    float* cr = c + r * ldc;
    if (nvalid == NR) {
      if (accumulate) {
        c0[r] = _mm256_add_ps(c0[r], _mm256_loadu_ps(cr));
        c1[r] = _mm256_add_ps(c1[r], _mm256_loadu_ps(cr + 8));
      }
      _mm256_storeu_ps(cr, c0[r]);
      _mm256_storeu_ps(cr + 8, c1[r]);
    } else {
      float tmp[NR];
      _mm256_storeu_ps(tmp, c0[r]);
      _mm256_storeu_ps(tmp + 8, c1[r]);
      for (int j = 0; j < nvalid; ++j) cr[j] = (accumulate ? cr[j] : 0.f) + tmp[j];
    }
  }
#else
  float acc[mr][NR] = {};
  for (int k = 0; k < kc; ++k)
    for (int r = 0; r < mr; ++r) {
      const float a = x[r * lda + k];
      for (int j = 0; j < NR; ++j) acc[r][j] += a * bp[k * NR + j];
    }
  for (int r = 0; r < mr; ++r)
    for (int j = 0; j < nvalid; ++j) c[r * ldc + j] = (accumulate ? c[r * ldc + j] : 0.f) + acc[r][j];
#endif
}

using MicroKernel = void (*)(const float*, int64_t, const float*, int, float*, int64_t, int, bool);
constexpr MicroKernel kMicroKernels[MR + 1] = {nullptr,          micro_kernel<1>, micro_kernel<2>, micro_kernel<3>,
                                               micro_kernel<4>, micro_kernel<5>, micro_kernel<6>};

template <class W>
void gemm_panels(const float* x, int M, int K, const W* w, float* y, int N, int64_t p0, int64_t p1) {
  thread_local std::vector<float> packed, row;
  packed.resize(size_t(KC) * NR);
  row.resize(KC);
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n0 = p * NR;
    const int nvalid = int(std::min<int64_t>(NR, N - n0));
    for (int k0 = 0; k0 < K; k0 += KC) {
      const int kc = std::min(KC, K - k0);
      pack_panel(w, K, n0, nvalid, k0, kc, packed.data(), row.data());
      for (int m = 0; m < M; m += MR) {
        const int mr = std::min(MR, M - m);
        kMicroKernels[mr](x + int64_t(m) * K + k0, K, packed.data(), kc, y + int64_t(m) * N + n0, N, nvalid,
                          k0 > 0);
      }
    }
  }
}

// y[:, n0:n1] = x @ W[n0:n1]^T through the BLAS; f16/bf16 rows are converted in L2-sized slabs.
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

template <class W, bool kUseBlas>
void matmul(const MatmulArgs& a, void* const* b, ThreadPool& pool) {
  const float* x = static_cast<const float*>(b[0]);  // [m, k]
  const W* w = static_cast<const W*>(b[1]);          // [n, k]
  const W* bias = static_cast<const W*>(b[2]);       // [n] or null
  float* y = static_cast<float*>(b[3]);              // [m, n]
  const int M = a.m, N = a.n, K = a.k;
  if (M <= kGemvMaxRows) {
    pool.parallel_for(N, [&](int64_t n0, int64_t n1) { gemv(x, M, K, w, y, N, n0, n1); });
  } else if (M <= kSmallGemmMaxRows) {
    // Blocks of kTileW rows of W, split evenly over the threads.
    pool.parallel_for((N + kTileW - 1) / kTileW, [&](int64_t b0, int64_t b1) {
      gemm_small(x, M, K, w, y, N, b0 * kTileW, std::min<int64_t>(N, b1 * kTileW));
    });
  } else if (kUseBlas && blas_available()) {
    pool.parallel_for(N, [&](int64_t n0, int64_t n1) { gemm_blas(x, M, K, w, y, N, n0, n1); });
  } else {
    const int64_t panels = (N + NR - 1) / NR;
    pool.parallel_for(panels, [&](int64_t p0, int64_t p1) { gemm_panels(x, M, K, w, y, N, p0, p1); });
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
  table.push_back(make_kernel<MatmulArgs>("matmul_f32", 4, matmul<float, true>));
  table.push_back(make_kernel<MatmulArgs>("matmul_f16", 4, matmul<f16, true>));
  table.push_back(make_kernel<MatmulArgs>("matmul_bf16", 4, matmul<bf16, true>));
  // The same op on our own GEMM even where a BLAS is present (tests, benchmarks, builds without one).
  table.push_back(make_kernel<MatmulArgs>("matmul_builtin_f32", 4, matmul<float, false>));
  table.push_back(make_kernel<MatmulArgs>("matmul_builtin_f16", 4, matmul<f16, false>));
  table.push_back(make_kernel<MatmulArgs>("matmul_builtin_bf16", 4, matmul<bf16, false>));
}

}  // namespace metal_engine::cpu
