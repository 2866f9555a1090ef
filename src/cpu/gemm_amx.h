// y = x W^T on Intel's AMX tiles, where the CPU has them and the kernel grants the tile state (amx_tiles() in
// machine_probes.h; METAL_ENGINE_CPU_AMX=0|1 forces it): the quantized formats from kAmxMinRows rows (batched
// decode, prefill) on AMX-INT8, f16 / bf16 weights from kAmxBf16MinRows rows on AMX-BF16 (below).
// Quantized: the integer dot products of the GEMV (matmul_quant.cpp), 16 x 16 outputs by two tile instructions per group of
// 32 weights:
// - x: each group of 32 of a row quantized once to int16 with its own scale (|q| <= 32767; one scale per row moved
//   the default model's logits by 0.04, its activations having outlier channels), q = 256 hi + lo split into a
//   signed high byte and an unsigned low byte, packed per (16-row tile, group) in the tiles' VNNI order
//   B[k / 4][m][k % 4] (8 rows of 64 bytes), beside the scale and scale * sum(q) per group (the b terms).
// - W: the codes of 16 rows of one group as the A tile (16 rows of 32 bytes, in k order as the formats give
//   them: no transposing), decoded once per 16 rows of W for every tile of x.
// - per group: C_hi = codes . hi and C_lo = codes . lo (TDPB[SU]SD / TDPB[SU]UD: u8 or i8 codes); the 16 x 16
//   int32 results are stored, combined as 256 C_hi + C_lo (exact: the GEMV's sum(code * q)), converted and
//   accumulated as acc[n][m] += a_g[n] * d_g[m] * C + b_g[n] * d_g[m] * sum_g(q[m]), in 16 zmm registers (lanes:
//   rows of x); two pairs of C tiles alternate so a group's products run while the previous group's are read
//   back. y gets acc transposed.
// Measured (2 threads, Q4_1, this Xeon, a probe against the dequantized tiles / panels): 16 x 3072 x 576
// 2.2-2.6x, 64 rows 3.2x, 512 rows 1.75x (460 against 263 GFLOP/s), 512 x 576 x 1536 2.2x.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "machine_probes.h"
#include "quant_blocks.h"
#include "thread_pool.h"

#if ME_AVX2 && defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__) && defined(__AVX512BW__) && \
    defined(__AVX512BF16__) && defined(__linux__)
#define ME_AMX 1  // this build has the AMX path
#endif

namespace metal_engine::cpu {

constexpr int kAmxMinRows = 6;  // the quantized matmul's dequantizing path starts here too (matmul_quant.cpp)
// rows of x from which matmul_f16 / matmul_bf16 take this path: measured (2 threads, the model's four matmul
// shapes, a compile beside it) 16 rows 0.75x the register tiles, 48 rows 1.2-1.8x, 64 rows 1.3-2.2x
constexpr int kAmxBf16MinRows = 48;

#if ME_AMX
namespace amx {

struct TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tile 0: A, 16 W rows x 32 codes; 1, 2: B, x's high / low bytes (8 x 64); 3-6: C pairs, 16 x 16 int32
// GCC's tile intrinsics do not tell the compiler which memory they read (_tile_loadd) or all of what
// _tile_loadconfig reads: a compiler barrier keeps the stores that fill a tile's source or the config before them.
inline void compiler_barrier() { asm volatile("" ::: "memory"); }

inline void load_config() {
  TileConfig c;
  c.rows[0] = 16;
  c.colsb[0] = 32;
  for (int t = 1; t <= 2; ++t) {
    c.rows[t] = 8;
    c.colsb[t] = 64;
  }
  for (int t = 3; t <= 6; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  compiler_barrier();
  _tile_loadconfig(&c);
}

// x [M, K] packed: per 16-row tile t and group g, hi / lo [8][16][4] bytes at (t * G + g) * 512; scale [t][g][16]
// the group's scale d, sums [t][g][16] = d * sum(q) (0 past M).
struct XPacked {
  int tiles = 0, G = 0;
  std::vector<int8_t> hi;
  std::vector<uint8_t> lo;
  std::vector<float> sums, scale;
};

inline void pack_x(const float* x, int M, int K, XPacked& p, ThreadPool& pool) {
  const int G = K / 32, T = (M + 15) / 16;
  p.tiles = T;
  p.G = G;
  p.hi.assign(size_t(T) * G * 512, 0);
  p.lo.assign(size_t(T) * G * 512, 0);
  p.sums.assign(size_t(T) * G * 16, 0.0f);
  p.scale.assign(size_t(T) * G * 16, 0.0f);
  pool.parallel_for(M, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* row = x + m * K;
      const int t = int(m / 16), mm = int(m % 16);
      for (int g = 0; g < G; ++g) {
        const __m512 x0 = _mm512_loadu_ps(row + 32 * g), x1 = _mm512_loadu_ps(row + 32 * g + 16);
        const float am = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
        const float d = am / 32767.0f;
        const __m512 id = _mm512_set1_ps(am > 0 ? 32767.0f / am : 0.0f);
        const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, id));
        const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, id));
        const size_t at = (size_t(t) * G + g) * 16 + mm;
        p.scale[at] = d;
        p.sums[at] = d * float(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
        alignas(16) uint32_t h[8], l[8];  // 4 k each, as bytes
        _mm_store_si128(reinterpret_cast<__m128i*>(h), _mm512_cvtepi32_epi8(_mm512_srai_epi32(q0, 8)));
        _mm_store_si128(reinterpret_cast<__m128i*>(h + 4), _mm512_cvtepi32_epi8(_mm512_srai_epi32(q1, 8)));
        _mm_store_si128(reinterpret_cast<__m128i*>(l), _mm512_cvtepi32_epi8(q0));
        _mm_store_si128(reinterpret_cast<__m128i*>(l + 4), _mm512_cvtepi32_epi8(q1));
        uint8_t* hb = reinterpret_cast<uint8_t*>(p.hi.data()) + (size_t(t) * G + g) * 512 + 4 * mm;
        uint8_t* lb = p.lo.data() + (size_t(t) * G + g) * 512 + 4 * mm;
        for (int kk = 0; kk < 8; ++kk) {
          std::memcpy(hb + 64 * kk, h + kk, 4);
          std::memcpy(lb + 64 * kk, l + kk, 4);
        }
      }
    }
  });
}

// y[m, n] for n in [n0, n1) (n0 a multiple of 16), every row of x
template <QuantType Q>
void gemm_rows(const XPacked& xp, int M, const uint8_t* w, int64_t row_bytes, float* y, int64_t ldy, int64_t n0,
               int64_t n1) {
  using F = Format<Q>;
  static_assert(!F::kPerHalf, "a scale per group (Q6_K's halves take the dequantizing path)");
  const int G = xp.G;
  thread_local std::vector<uint8_t> codes;  // [G][16][32]: the A tiles of 16 rows of W
  thread_local std::vector<float> sa, sb;   // [16][G]: their groups' a and b, a row of W's at a time
  codes.resize(size_t(G) * 512 + 64);
  sa.resize(size_t(G) * 16);
  sb.resize(size_t(G) * 16);
  uint8_t* A = codes.data() + (64 - reinterpret_cast<uintptr_t>(codes.data()) % 64) % 64;
  alignas(64) int32_t c_hi[256], c_lo[256];
  alignas(64) float out[256];
  load_config();
  for (int64_t nb = n0; nb < n1; nb += 16) {
    const int nr = int(std::min<int64_t>(16, n1 - nb));
    for (int r = 0; r < 16; ++r) {
      float* ra = sa.data() + size_t(r) * G;
      float* rb = sb.data() + size_t(r) * G;
      if (r >= nr) {
        for (int g = 0; g < G; ++g) std::memset(A + size_t(g) * 512 + 32 * r, 0, 32);
        std::fill(ra, ra + G, 0.0f);
        std::fill(rb, rb + G, 0.0f);
        continue;
      }
      const uint8_t* wr = w + (nb + r) * row_bytes;
      int g = 0;
      for (; g + 8 <= G; g += 8) {  // the scales 8 groups at a time, as the GEMV takes them
        __m256 va[2], vb[2];
        F::chunk(wr, g, va, vb);
        _mm256_storeu_ps(ra + g, va[0]);
        _mm256_storeu_ps(rb + g, vb[0]);
      }
      for (; g < G; ++g) {
        GroupScales gs[F::kGroups];
        F::scales(wr + size_t(g / F::kGroups) * F::kBytes, gs);
        ra[g] = gs[g % F::kGroups].a[0];
        rb[g] = gs[g % F::kGroups].b[0];
      }
      for (g = 0; g < G; ++g)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(A + size_t(g) * 512 + 32 * r),
                            F::codes(wr + size_t(g / F::kGroups) * F::kBytes, g % F::kGroups));
    }
    compiler_barrier();  // A's codes written above, read by _tile_loadd
    for (int t = 0; t < xp.tiles; ++t) {
      const int8_t* hi = xp.hi.data() + size_t(t) * G * 512;
      const uint8_t* lo = xp.lo.data() + size_t(t) * G * 512;
      // group g's products into C tiles 3, 4 (g even) or 5, 6 (g odd): GCC's tile intrinsics are macros that
      // paste the tile number into the instruction, so each pair is spelled out
      auto issue = [&](int g) {
        _tile_loadd(0, A + size_t(g) * 512, 32);
        _tile_loadd(1, hi + size_t(g) * 512, 64);
        _tile_loadd(2, lo + size_t(g) * 512, 64);
        if (g & 1) {
          _tile_zero(5);
          _tile_zero(6);
          if constexpr (F::kSigned) {
            _tile_dpbssd(5, 0, 1);
            _tile_dpbsud(6, 0, 2);
          } else {
            _tile_dpbusd(5, 0, 1);
            _tile_dpbuud(6, 0, 2);
          }
        } else {
          _tile_zero(3);
          _tile_zero(4);
          if constexpr (F::kSigned) {
            _tile_dpbssd(3, 0, 1);
            _tile_dpbsud(4, 0, 2);
          } else {
            _tile_dpbusd(3, 0, 1);
            _tile_dpbuud(4, 0, 2);
          }
        }
      };
      __m512 acc[16];  // acc[n][m]: lanes are rows of x
      for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
      issue(0);
      for (int g = 0; g < G; ++g) {
        if (g & 1) {
          _tile_stored(5, c_hi, 64);
          _tile_stored(6, c_lo, 64);
        } else {
          _tile_stored(3, c_hi, 64);
          _tile_stored(4, c_lo, 64);
        }
        if (g + 1 < G) issue(g + 1);
        const __m512 sums = _mm512_loadu_ps(xp.sums.data() + (size_t(t) * G + g) * 16);
        const __m512 d = _mm512_loadu_ps(xp.scale.data() + (size_t(t) * G + g) * 16);
        const float* a = sa.data() + g;  // a[G * r]: row r's
        const float* b = sb.data() + g;
        for (int r = 0; r < 16; ++r) {
          const __m512i v = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(c_hi + 16 * r), 8),
                                             _mm512_load_si512(c_lo + 16 * r));
          acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_mul_ps(_mm512_set1_ps(a[G * r]), d), acc[r]);
          acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(b[G * r]), sums, acc[r]);
        }
      }
      for (int r = 0; r < 16; ++r) _mm512_store_ps(out + 16 * r, acc[r]);
      const int mr = std::min(16, M - 16 * t);
      for (int m = 0; m < mr; ++m)
        for (int r = 0; r < nr; ++r) y[int64_t(16 * t + m) * ldy + nb + r] = out[16 * r + m];
    }
  }
  _tile_release();  // the tile state back to its init state: context switches need not save it
}

// ---- f16 / bf16 weights (prefill): AMX-BF16 with x and W split into two bf16 each (v = hi + lo, hi = bf16(v),
// lo = bf16(v - hi): 16 of the significand's bits), C += W_hi x_hi + W_hi x_lo + W_lo x_hi in the tiles' f32 (lo
// times lo dropped: at most ~2^-16 of each term, 1.8e-5 seen with K = 1; bf16 W is exact in hi: two products). No
// epilogue per k: C accumulates over the whole row. Measured (probe, 2 threads, this Xeon, a CI run beside it):
// 512 x 3072 x 576 f16 at 382 GFLOP/s; |error| / sum |terms| under 1e-6 on random rows (K = 576, 1536).
// Tiles: 0, 1 W hi / lo (16 rows x 32 k); 2, 3 and 6, 7 x hi / lo of two row tiles (16 k pairs x 16 rows x 2);
// 4, 5 their C.

inline void load_config_bf16() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  compiler_barrier();
  _tile_loadconfig(&c);
}

inline __m256i bf16_round(__m512 v) { return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)); }
inline __m512 bf16_widen(__m256i b) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)); }
// 16 floats -> their hi and lo bf16
inline void split_bf16(__m512 v, __m256i& hi, __m256i& lo) {
  hi = bf16_round(v);
  lo = bf16_round(_mm512_sub_ps(v, bf16_widen(hi)));
}

// x [M, K] as hi / lo per (16-row tile t, 32-k step s) at (t * S + s) * 512 bf16: [16 k pairs][16 rows][2]; K
// padded with zeros to S = ceil(K / 32) steps, rows past M zero.
struct XSplit {
  int tiles = 0, steps = 0;
  std::vector<uint16_t> hi, lo;
};

inline void pack_x_bf16(const float* x, int M, int K, XSplit& p, ThreadPool& pool) {
  const int S = (K + 31) / 32, T = (M + 15) / 16;
  p.tiles = T;
  p.steps = S;
  p.hi.assign(size_t(T) * S * 512, 0);
  p.lo.assign(size_t(T) * S * 512, 0);
  pool.parallel_for(M, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* row = x + m * K;
      for (int s = 0; s < S; ++s) {
        alignas(32) uint32_t h[16], l[16];  // k pairs
        for (int half = 0; half < 2; ++half) {
          const int k0 = 32 * s + 16 * half;
          const __mmask16 live = k0 >= K ? 0 : K - k0 >= 16 ? 0xFFFF : __mmask16((1u << (K - k0)) - 1);
          __m256i vh, vl;
          split_bf16(_mm512_maskz_loadu_ps(live, row + k0), vh, vl);
          _mm256_store_si256(reinterpret_cast<__m256i*>(h + 8 * half), vh);
          _mm256_store_si256(reinterpret_cast<__m256i*>(l + 8 * half), vl);
        }
        uint32_t* hp = reinterpret_cast<uint32_t*>(p.hi.data() + (size_t(m / 16) * S + s) * 512) + m % 16;
        uint32_t* lp = reinterpret_cast<uint32_t*>(p.lo.data() + (size_t(m / 16) * S + s) * 512) + m % 16;
        for (int kk = 0; kk < 16; ++kk) {
          hp[16 * kk] = h[kk];
          lp[16 * kk] = l[kk];
        }
      }
    }
  });
}

// 16 weights of a row from k0 (masked past K) as f32
template <class W>
inline __m512 load_w16(const W* p, int n) {
  const __mmask16 live = n >= 16 ? 0xFFFF : __mmask16((1u << n) - 1);
  const __m256i bits = _mm256_maskz_loadu_epi16(live, p);
  if constexpr (std::is_same_v<W, f16>) return _mm512_cvtph_ps(bits);
  else return bf16_widen(bits);
}

// y[m, n] for n in [n0, n1), rows of x in chunks of `chunk_rows` (a multiple of 32) that stay in L2 while the
// thread's W passes them (each 16 rows of W split into bf16 once per chunk)
template <class W>
void gemm_bf16_rows(const XSplit& xp, int M, int K, const W* w, float* y, int64_t ldy, int64_t n0, int64_t n1,
                    int chunk_rows) {
  constexpr bool kExactHi = std::is_same_v<W, bf16>;  // bf16 W is its hi: no lo products
  const int S = xp.steps;
  thread_local std::vector<uint16_t> wsplit;  // [S][hi | lo][16 rows][32]
  wsplit.resize(size_t(S) * 1024 + 32);
  uint16_t* ws = wsplit.data() + (32 - (reinterpret_cast<uintptr_t>(wsplit.data()) / 2) % 32) % 32;
  alignas(64) float out[2][256];
  load_config_bf16();
  for (int c0 = 0; c0 < xp.tiles; c0 += chunk_rows / 16) {
    const int c1 = std::min(xp.tiles, c0 + chunk_rows / 16);
    for (int64_t nb = n0; nb < n1; nb += 16) {
      const int nr = int(std::min<int64_t>(16, n1 - nb));
      for (int r = 0; r < 16; ++r) {
        for (int s = 0; s < S; ++s) {
          __m256i h[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()}, l[2] = {h[0], h[0]};
          if (r < nr) {
            const W* row = w + (nb + r) * int64_t(K);
            for (int half = 0; half < 2; ++half) {
              const int k0 = 32 * s + 16 * half;
              if (k0 < K) split_bf16(load_w16(row + k0, K - k0), h[half], l[half]);
            }
          }
          uint16_t* dst = ws + size_t(s) * 1024 + 32 * r;
          _mm256_store_si256(reinterpret_cast<__m256i*>(dst), h[0]);
          _mm256_store_si256(reinterpret_cast<__m256i*>(dst + 16), h[1]);
          _mm256_store_si256(reinterpret_cast<__m256i*>(dst + 512), l[0]);
          _mm256_store_si256(reinterpret_cast<__m256i*>(dst + 528), l[1]);
        }
      }
      compiler_barrier();  // ws written above, read by _tile_loadd
      for (int t = c0; t < c1; t += 2) {
        const bool two = t + 1 < c1;
        const uint16_t* xh = xp.hi.data() + size_t(t) * S * 512;
        const uint16_t* xl = xp.lo.data() + size_t(t) * S * 512;
        _tile_zero(4);
        _tile_zero(5);
        for (int s = 0; s < S; ++s) {
          _tile_loadd(0, ws + size_t(s) * 1024, 64);
          if constexpr (!kExactHi) _tile_loadd(1, ws + size_t(s) * 1024 + 512, 64);
          _tile_loadd(2, xh + size_t(s) * 512, 64);
          _tile_loadd(3, xl + size_t(s) * 512, 64);
          _tile_dpbf16ps(4, 0, 2);
          _tile_dpbf16ps(4, 0, 3);
          if constexpr (!kExactHi) _tile_dpbf16ps(4, 1, 2);
          if (two) {
            _tile_loadd(6, xh + size_t(S + s) * 512, 64);
            _tile_loadd(7, xl + size_t(S + s) * 512, 64);
            _tile_dpbf16ps(5, 0, 6);
            _tile_dpbf16ps(5, 0, 7);
            if constexpr (!kExactHi) _tile_dpbf16ps(5, 1, 6);
          }
        }
        _tile_stored(4, out[0], 64);
        _tile_stored(5, out[1], 64);
        for (int u = 0; u < (two ? 2 : 1); ++u) {
          const int mr = std::min(16, M - 16 * (t + u));
          for (int m = 0; m < mr; ++m)
            for (int r = 0; r < nr; ++r) y[int64_t(16 * (t + u) + m) * ldy + nb + r] = out[u][16 * r + m];
        }
      }
    }
  }
  _tile_release();
}

// A packed x kept between calls (a thread_local: decode steps reuse it) unless it grew past 64 MiB (a long
// prefill's), then freed.
template <class X>
void release_if_large(X& p) {
  if ((p.hi.capacity() + p.lo.capacity()) * sizeof(p.hi[0]) > (size_t(64) << 20)) p = X{};
}

// Rows of x per chunk of gemm_bf16_rows: hi + lo of at most ~1 MiB, a multiple of 32
inline int bf16_chunk_rows(int K) { return std::max(32, int((1 << 20) / (int64_t((K + 31) / 32 * 32) * 4)) / 32 * 32); }

// The two entry points: y [M, N] (row stride ldy) = x [M, K] W^T, x packed on the calling thread into its
// thread_local buffer (read by the pool's threads through a reference: a thread_local named inside the lambda
// would be each thread's own), 16 rows of W a work item.
template <QuantType Q>
void quant_matmul(const float* x, int M, int K, const uint8_t* w, int64_t row_bytes, float* y, int N, int64_t ldy,
                  ThreadPool& pool) {
  thread_local XPacked packed;
  XPacked& xp = packed;
  pack_x(x, M, K, xp, pool);
  pool.parallel_for((N + 15) / 16, [&](int64_t b0, int64_t b1) {
    gemm_rows<Q>(xp, M, w, row_bytes, y, ldy, b0 * 16, std::min<int64_t>(N, b1 * 16));
  });
  release_if_large(xp);
}

template <class W>
void matmul_16bit(const float* x, int M, int K, const W* w, float* y, int N, int64_t ldy, ThreadPool& pool) {
  thread_local XSplit packed;
  XSplit& xp = packed;
  pack_x_bf16(x, M, K, xp, pool);
  const int chunk = bf16_chunk_rows(K);
  pool.parallel_for((N + 15) / 16, [&](int64_t b0, int64_t b1) {
    gemm_bf16_rows(xp, M, K, w, y, ldy, b0 * 16, std::min<int64_t>(N, b1 * 16), chunk);
  });
  release_if_large(xp);
}

}  // namespace amx
#endif

}  // namespace metal_engine::cpu
