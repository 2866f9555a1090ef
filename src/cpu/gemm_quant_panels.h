// y = x W^T for quantized W from 6 rows of x (batched decode, prefill; kDequantMinRows in matmul_quant.cpp) on
// AVX-512 VNNI CPUs where AMX does not run (METAL_ENGINE_CPU_QUANT_PANELS=0 turns it off: machine_probes.h),
// except from 256 rows where the float GEMM's 512-bit panels run: W repacked per call, 24 rows at a time, into
// panels whose 32-bit lanes are W rows, so one dpwssd does 8 W rows x 2 weights of one row of x and the float work
// per group of 32 weights (scales, the b terms) is shared by 8 W rows instead of being paid per row (the GEMV's
// lanes are weights).
// - x: each row quantized once to int16 per group of 32 with the group's own scale (XRows with S = 1; the GEMV's
//   scale per 256 moved the default model's prefill logits by 0.022, past the tests' 0.02), b-term sums per half.
// - W: per 8 rows and group of 32, the codes widened to int16 (Format::codes16) and transposed so vector p holds
//   codes 2p, 2p + 1 of each of the 8 rows (16 vectors), beside the group's scales a[h], b[h] per row (lanes).
//   A work item packs kUnit = 24 rows of W for every group into a thread_local buffer (L1/L2) and runs a block of
//   rows of x against it.
// - register tile: kMR = 4 rows of x x 24 W rows; per pair of codes p: three vector loads of W, one broadcast of
//   x's two int16 per row, 12 dpwssd into int32 accumulators; per group (per half for Q6_K) and accumulator one
//   convert, one multiply by x's scale, one FMA by a and one by b * sum(x).
// Measured (Zen 4, 2026-12-04; one thread, the default model's shapes, Q4_1): 16 rows ~140 GFLOP/s and 64 rows
// ~162 against ~70-85 for the dequantizing tiles and ~90 for f16 weights on the float tiles (16 W rows per tile:
// 5-7% slower; x's scale per 256, multiplied once per 8 groups: 3-4% faster, but see above). Tried: codes packed
// as bytes and widened in the kernel (half the packing work; equal at 16 rows, 4% slower at 64) and two sets of
// integer accumulators (dpwssd's latency; the extra epilogue made it 12% slower).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "quant_blocks.h"
#include "thread_pool.h"

// AVX-512 VNNI only: AVX-VNNI without AVX-512 (16 registers) would need a smaller tile, and no machine here runs it
#if ME_AVX2 && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define ME_QUANT_PANELS 1  // this build has the path
#endif

namespace metal_engine::cpu {

#if ME_QUANT_PANELS
namespace qpanel {

constexpr int kLanes = 8;  // W rows per vector
constexpr int kNW = 3;     // vectors of W rows per register tile
constexpr int kUnit = kLanes * kNW;
constexpr int kMR = 4;  // rows of x per register tile: 2 x 12 accumulators of AVX-512VL's 32 ymm registers

// 8 rows of W, one group of 32 weights: codes[p] lane j = row j's codes 2p, 2p + 1 (int16); a[h], b[h] lane j =
// row j's scales of half h (16 weights)
struct alignas(32) Group {
  __m256i codes[16];
  __m256 a[2], b[2];
};

inline __m256i dp(__m256i acc, __m256i w, __m256i x) { return _mm256_dpwssd_epi32(acc, w, x); }

// 8 vectors of 8 dwords -> their transpose (out[i] lane j = in[j] lane i)
inline void transpose8(const __m256i* in, __m256i* out) {
  __m256i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(in[2 * i], in[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(in[2 * i], in[2 * i + 1]);
  }
  // rows 0-3 in u[0..3], 4-7 in u[4..7]: u[4 q + i] holds dwords i | i + 4 of the four rows
  for (int q = 0; q < 2; ++q) {
    const __m256i* a = t + 4 * q;
    u[4 * q + 0] = _mm256_unpacklo_epi64(a[0], a[2]);
    u[4 * q + 1] = _mm256_unpackhi_epi64(a[0], a[2]);
    u[4 * q + 2] = _mm256_unpacklo_epi64(a[1], a[3]);
    u[4 * q + 3] = _mm256_unpackhi_epi64(a[1], a[3]);
  }
  for (int i = 0; i < 4; ++i) {
    out[i] = _mm256_permute2x128_si256(u[i], u[4 + i], 0x20);
    out[i + 4] = _mm256_permute2x128_si256(u[i], u[4 + i], 0x31);
  }
}

// Q4_0 / Q4_1: the 16 bytes of codes of one group of 8 rows (byte i: codes i and i + 16 as low and high nibble) ->
// the 16 code vectors. The 16-bit words are transposed first (word p of every row in one vector: 24 unpacks of
// 128 bits), then each widened to int16 and split into its nibbles, lane j = row j: pair p and pair p + 8. (The
// general path widens each row and transposes the two 256-bit halves: 48 unpacks and permutes.)
inline void nibble_codes(const __m128i* b, __m256i* codes) {
  __m128i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm_unpacklo_epi16(b[2 * i], b[2 * i + 1]);      // words 0-3 of rows 2i, 2i + 1, interleaved
    t[2 * i + 1] = _mm_unpackhi_epi16(b[2 * i], b[2 * i + 1]);  // words 4-7
  }
  for (int i = 0; i < 2; ++i)
    for (int h = 0; h < 2; ++h) {  // rows 4i .. 4i + 3: words 4h .. 4h + 3
      u[4 * i + 2 * h] = _mm_unpacklo_epi32(t[4 * i + h], t[4 * i + 2 + h]);
      u[4 * i + 2 * h + 1] = _mm_unpackhi_epi32(t[4 * i + h], t[4 * i + 2 + h]);
    }
  const __m256i m = _mm256_set1_epi16(0xF);
  for (int p = 0; p < 8; ++p) {  // u[q] (q < 4): words 2q, 2q + 1 of rows 0-3; u[4 + q]: of rows 4-7
    const __m128i a = u[p / 2], c = u[4 + p / 2];
    const __m128i v = p & 1 ? _mm_unpackhi_epi64(a, c) : _mm_unpacklo_epi64(a, c);  // word p of rows 0-7
    const __m256i w = _mm256_cvtepu8_epi16(v);
    codes[p] = _mm256_and_si256(w, m);
    codes[p + 8] = _mm256_srli_epi16(w, 4);
  }
}

// rows n0 .. n0 + kUnit - 1 of W (zeros past N) -> pk[G][kNW]. Scales: a whole chunk of 8 groups per row by
// Format::chunk (lanes: groups), transposed to lanes = rows; the last chunk of a row not a multiple of 256 one
// group at a time.
template <QuantType Q>
void pack_unit(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t N, int G, Group* pk) {
  using F = Format<Q>;
  for (int p = 0; p < kNW; ++p) {
    const int64_t r0 = n0 + kLanes * p;
    const int rows = int(std::clamp<int64_t>(N - r0, 0, kLanes));
    const uint8_t* wr[kLanes];
    for (int j = 0; j < kLanes; ++j) wr[j] = w + (r0 + std::min(j, std::max(rows - 1, 0))) * row_bytes;
    for (int g0 = 0; g0 < G; g0 += 8) {
      const int n = std::min(8, G - g0);
      if (n == 8) {
        __m256i a[2][kLanes], b[2][kLanes];  // [h][row j], lane i: group g0 + i
        for (int j = 0; j < kLanes; ++j) {
          __m256 A[2], B[2];
          if (j < rows) {
            F::chunk(wr[j], g0, A, B);
          } else {
            A[0] = A[1] = B[0] = B[1] = _mm256_setzero_ps();
          }
          for (int h = 0; h < 2; ++h) {
            a[h][j] = _mm256_castps_si256(A[h]);
            b[h][j] = _mm256_castps_si256(B[h]);
          }
        }
        for (int h = 0; h < (F::kPerHalf ? 2 : 1); ++h) {  // the kernel reads half 0's only, unless per half
          __m256i ta[kLanes], tb[kLanes];
          transpose8(a[h], ta);
          transpose8(b[h], tb);
          for (int i = 0; i < 8; ++i) {
            pk[size_t(g0 + i) * kNW + p].a[h] = _mm256_castsi256_ps(ta[i]);
            pk[size_t(g0 + i) * kNW + p].b[h] = _mm256_castsi256_ps(tb[i]);
          }
        }
      } else {
        for (int i = 0; i < n; ++i) {
          alignas(32) float a[2][kLanes] = {}, b[2][kLanes] = {};
          const int g = g0 + i;
          for (int j = 0; j < rows; ++j) {
            GroupScales gs[F::kGroups];
            F::scales(wr[j] + size_t(g / F::kGroups) * F::kBytes, gs);
            for (int h = 0; h < 2; ++h) {
              a[h][j] = gs[g % F::kGroups].a[h];
              b[h][j] = gs[g % F::kGroups].b[h];
            }
          }
          for (int h = 0; h < 2; ++h) {
            pk[size_t(g) * kNW + p].a[h] = _mm256_load_ps(a[h]);
            pk[size_t(g) * kNW + p].b[h] = _mm256_load_ps(b[h]);
          }
        }
      }
      if constexpr (Q == QuantType::Q4_0 || Q == QuantType::Q4_1) {  // codes from the bytes transposed first
        for (int i = 0; i < n; ++i) {
          const int g = g0 + i;
          __m128i b[kLanes];
          for (int j = 0; j < kLanes; ++j)
            b[j] = j < rows ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[j] + size_t(g) * F::kBytes +
                                                                              F::kBytes - 16))
                            : _mm_setzero_si128();
          nibble_codes(b, pk[size_t(g) * kNW + p].codes);
        }
        continue;
      }
      for (int i = 0; i < n; ++i) {
        const int g = g0 + i;
        __m256i lo[kLanes], hi[kLanes];
        for (int j = 0; j < kLanes; ++j) {
          if (j < rows) {
            F::codes16(wr[j] + size_t(g / F::kGroups) * F::kBytes, g % F::kGroups, lo[j], hi[j]);
          } else {
            lo[j] = hi[j] = _mm256_setzero_si256();
          }
        }
        Group& o = pk[size_t(g) * kNW + p];
        transpose8(lo, o.codes);
        transpose8(hi, o.codes + 8);
      }
    }
  }
}

// y[m0 + r, n0 .. n0 + kUnit - 1] (columns < N) for r < MR; x has a scale per group (XRows::S == 1)
template <bool kPerHalf, int MR>
void tile(const Group* pk, const XRows& x, int m0, float* y, int64_t ldy, int64_t n0, int64_t N) {
  const int G = x.G;
  __m256 acc[MR][kNW];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < kNW; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int g = 0; g < G; ++g) {
    const Group* gp = pk + size_t(g) * kNW;
    const int16_t* xq[MR];
    for (int r = 0; r < MR; ++r) xq[r] = x.q + (size_t(m0 + r) * G + g) * 32;
    __m256i ia[MR][kNW];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < kNW; ++v) ia[r][v] = _mm256_setzero_si256();
    for (int h = 0; h < 2; ++h) {
      for (int p = 8 * h; p < 8 * h + 8; ++p) {
        __m256i wv[kNW];
        for (int v = 0; v < kNW; ++v) wv[v] = _mm256_load_si256(gp[v].codes + p);
        for (int r = 0; r < MR; ++r) {
          int32_t pair;
          std::memcpy(&pair, xq[r] + 2 * p, 4);
          const __m256i xb = _mm256_set1_epi32(pair);
          for (int v = 0; v < kNW; ++v) ia[r][v] = dp(ia[r][v], wv[v], xb);
        }
      }
      if (kPerHalf || h == 1) {
        for (int r = 0; r < MR; ++r) {
          const size_t at = size_t(m0 + r) * G + g;
          const __m256 d = _mm256_set1_ps(x.d[at]);
          const __m256 s = _mm256_set1_ps(kPerHalf ? (h ? x.s1[at] : x.s0[at]) : x.s0[at] + x.s1[at]);
          for (int v = 0; v < kNW; ++v) {
            const int e = kPerHalf ? h : 0;
            acc[r][v] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(ia[r][v]), d), gp[v].a[e], acc[r][v]);
            acc[r][v] = _mm256_fmadd_ps(gp[v].b[e], s, acc[r][v]);
            ia[r][v] = _mm256_setzero_si256();
          }
        }
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    float* yr = y + int64_t(m0 + r) * ldy;
    for (int v = 0; v < kNW; ++v) {
      const int64_t n = n0 + kLanes * v;
      if (n + kLanes <= N) {
        _mm256_storeu_ps(yr + n, acc[r][v]);
      } else if (n < N) {
        alignas(32) float tmp[kLanes];
        _mm256_store_ps(tmp, acc[r][v]);
        std::memcpy(yr + n, tmp, size_t(N - n) * sizeof(float));
      }
    }
  }
}

constexpr int kRowBlock = 128;  // rows of x per pass over the thread's W (x's int16 then stays in L2)

// xq: x quantized (M rows); y [M, N] (row stride ldy). A unit is packed once per block of kRowBlock rows of x.
template <QuantType Q>
void gemm(const XRows& xq, int M, const uint8_t* w, int64_t row_bytes, float* y, int N, int64_t ldy,
          ThreadPool& pool) {
  using F = Format<Q>;
  pool.parallel_for((N + kUnit - 1) / kUnit, [&](int64_t u0, int64_t u1) {
    thread_local std::vector<Group> pk;
    pk.resize(size_t(xq.G) * kNW);
    for (int mb = 0; mb < M; mb += kRowBlock) {
      const int me = std::min(M, mb + kRowBlock);
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t n0 = u * kUnit;
        pack_unit<Q>(w, row_bytes, n0, N, xq.G, pk.data());
        // the next unit's rows of W (contiguous) prefetched into L2 a slice per tile while this one's tiles run:
        // the packing reads 8 rows a group at a time, which the hardware prefetchers follow poorly from memory
        const uint8_t* next = w + std::min<int64_t>(N, n0 + kUnit) * row_bytes;
        const int64_t next_bytes = (u + 1 < u1 ? std::min<int64_t>(kUnit, N - n0 - kUnit) : 0) * row_bytes;
        const int tiles = std::max(1, (me - mb) / kMR);
        const int64_t slice = (next_bytes / 64 + tiles - 1) / tiles * 64;
        int64_t pf = 0;
        int m0 = mb;
        for (; m0 + kMR <= me; m0 += kMR) {
          for (const int64_t end = std::min(next_bytes, pf + slice); pf < end; pf += 64)
            _mm_prefetch(reinterpret_cast<const char*>(next + pf), _MM_HINT_T1);
          tile<F::kPerHalf, kMR>(pk.data(), xq, m0, y, ldy, n0, N);
        }
        for (; pf < next_bytes; pf += 64) _mm_prefetch(reinterpret_cast<const char*>(next + pf), _MM_HINT_T1);
        switch (me - m0) {
          case 1: tile<F::kPerHalf, 1>(pk.data(), xq, m0, y, ldy, n0, N); break;
          case 2: tile<F::kPerHalf, 2>(pk.data(), xq, m0, y, ldy, n0, N); break;
          case 3: tile<F::kPerHalf, 3>(pk.data(), xq, m0, y, ldy, n0, N); break;
          default: break;
        }
      }
    }
  });
}

}  // namespace qpanel
#endif

}  // namespace metal_engine::cpu
