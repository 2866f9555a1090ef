// y = x W^T for the quantized formats from kAmxMinRows rows (batched decode, prefill) on Intel's AMX tiles, where
// the CPU has AMX-INT8 and the kernel grants the tile state (amx_quant_gemm() in machine_probes.h).
// The integer dot products of the GEMV (matmul_quant.cpp), 16 x 16 outputs by two tile instructions per group of
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
// Measured (2 threads, Q4_1, this Xeon, /tmp probe against the dequantized tiles / panels): 16 x 3072 x 576
// 2.2-2.6x, 64 rows 3.2x, 512 rows 1.75x (460 against 263 GFLOP/s), 512 x 576 x 1536 2.2x.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "machine_probes.h"
#include "quant_blocks.h"
#include "thread_pool.h"

#if ME_AVX2 && defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512F__) && defined(__AVX512BW__) && \
    defined(__linux__)
#define ME_AMX 1  // this build has the AMX path
#endif

namespace metal_engine::cpu {

constexpr int kAmxMinRows = 6;  // the quantized matmul's dequantizing path starts here too (matmul_quant.cpp)

#if ME_AMX
namespace amx {

struct TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tile 0: A, 16 W rows x 32 codes; 1, 2: B, x's high / low bytes (8 x 64); 3-6: C pairs, 16 x 16 int32
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
  thread_local std::vector<float> sa, sb;   // [G][16]: their groups' a and b
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
      if (r >= nr) {
        for (int g = 0; g < G; ++g) {
          std::memset(A + size_t(g) * 512 + 32 * r, 0, 32);
          sa[size_t(g) * 16 + r] = sb[size_t(g) * 16 + r] = 0.0f;
        }
        continue;
      }
      const uint8_t* wr = w + (nb + r) * row_bytes;
      GroupScales gs[F::kGroups];
      for (int blk = 0; blk < G / F::kGroups; ++blk) {
        const uint8_t* b = wr + size_t(blk) * F::kBytes;
        F::scales(b, gs);
        for (int j = 0; j < F::kGroups; ++j) {
          const int g = blk * F::kGroups + j;
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(A + size_t(g) * 512 + 32 * r), F::codes(b, j));
          sa[size_t(g) * 16 + r] = gs[j].a[0];
          sb[size_t(g) * 16 + r] = gs[j].b[0];
        }
      }
    }
    for (int t = 0; t < xp.tiles; ++t) {
      const int8_t* hi = xp.hi.data() + size_t(t) * G * 512;
      const uint8_t* lo = xp.lo.data() + size_t(t) * G * 512;
      // group g's products into C tiles 3, 4 (g even) or 5, 6 (g odd); tile numbers are immediates
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
        const float* a = sa.data() + size_t(g) * 16;
        const float* b = sb.data() + size_t(g) * 16;
        for (int r = 0; r < 16; ++r) {
          const __m512i v = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(c_hi + 16 * r), 8),
                                             _mm512_load_si512(c_lo + 16 * r));
          acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_mul_ps(_mm512_set1_ps(a[r]), d), acc[r]);
          acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(b[r]), sums, acc[r]);
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

}  // namespace amx
#endif

}  // namespace metal_engine::cpu
