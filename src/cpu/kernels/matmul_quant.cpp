// matmul_<q> for the quantized formats (src/cpu/quant_blocks.h): y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]),
// x f32, W [n, k] as rows of blocks. Each row of x is quantized once per call to int16 groups of 32 with their
// scale (finer than llama.cpp's int8 activations: logits as a float matmul's); each weight group's dot product
// with it is an integer dot product (AVX2: madd on the codes widened to int16; AVX-512 VNNI / AVX-VNNI: 256-bit dpwssd;
// NEON: vmlal on the codes widened to int16; plain C++ elsewhere), scaled once per group.
// A weight group is decoded once for up to 4 rows of x. Rows of x go in blocks of kRowBlock against the
// thread's share of W (which stays in L2 between blocks); decode (1-4 rows) streams W once. From
// kDequantMinRows rows (batched decode, prefill): Intel's AMX tiles where the CPU has them (gemm_amx.h), else on
// AVX-512 VNNI W repacked per call into panels whose lanes are W rows (gemm_quant_panels.h), else W dequantized to
// f32 slabs for the float GEMM's tiles or 512-bit panels.
// embedding_<q>: the table's rows dequantized on gather.
#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 headers make their "undefined" placeholder vectors from themselves (`__m512 __Y = __Y;`), which
// -Wall reports at every inlined use in this file.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "../cpu_kernels.h"
#include "../gemm_amx.h"
#include "../gemm_panels.h"
#include "../gemm_quant_panels.h"
#include "../gemm_tiles.h"
#include "../quant_blocks.h"
#include "metal_engine/dtype.h"

namespace metal_engine::cpu {

#if ME_AVX2
static inline int hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}
#endif

void quantize_x_row(const float* x, int K, const XRows& rows, int r) {
  const int G = rows.G;
  int16_t* qrow = const_cast<int16_t*>(rows.q) + size_t(r) * G * 32;
  float* drow = const_cast<float*>(rows.d) + size_t(r) * rows.C;
  float* s0row = const_cast<float*>(rows.s0) + size_t(r) * G;
  float* s1row = const_cast<float*>(rows.s1) + size_t(r) * G;
  for (int c = 0; c < rows.C; ++c) {
    const int g0 = rows.S * c, n = std::min(rows.S, G - g0);
    const float* v = x + 32 * g0;
    float am = 0;
#if ME_AVX2
    __m256 amax = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int i = 0; i < 4 * n; ++i) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + 8 * i)));
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    am = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
#else
    for (int i = 0; i < 32 * n; ++i) am = std::max(am, std::fabs(v[i]));
#endif
    const float d = am / 32767.0f, id = am > 0 ? 32767.0f / am : 0.0f;
    drow[c] = d;
    for (int j = 0; j < n; ++j) {
      const float* vg = v + 32 * j;
      int16_t* q16 = qrow + 32 * (g0 + j);
      int sums[2];
#if ME_AVX2
      __m256i q[4];
      for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(vg + 8 * i), _mm256_set1_ps(id)));
      sums[0] = hsum_i32(_mm256_add_epi32(q[0], q[1]));
      sums[1] = hsum_i32(_mm256_add_epi32(q[2], q[3]));
      for (int i = 0; i < 2; ++i)  // packs works per 128-bit lane: put the 16 values back in order
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q16 + 16 * i),
                            _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2 * i], q[2 * i + 1]), 0xD8));
#else
      sums[0] = sums[1] = 0;
      for (int i = 0; i < 32; ++i) {
        const int qi = int(std::nearbyint(vg[i] * id));
        q16[i] = int16_t(qi);
        sums[i / 16] += qi;
      }
#endif
      s0row[g0 + j] = d * float(sums[0]);
      s1row[g0 + j] = d * float(sums[1]);
    }
  }
}

namespace {

// row [cols / block_elems blocks] -> f32 [cols]: w = a * code + b per group half
template <QuantType Q>
void dequantize_row_q(const uint8_t* row, float* out, int64_t cols) {
  using F = Format<Q>;
  GroupScales gs[F::kGroups];
  for (int64_t blk = 0; blk < cols / (32 * F::kGroups); ++blk) {
    const uint8_t* b = row + blk * F::kBytes;
    F::scales(b, gs);
    for (int j = 0; j < F::kGroups; ++j) {
      float* o = out + (blk * F::kGroups + j) * 32;
#if ME_AVX2
      const __m256i c = F::codes(b, j);
      const __m128i half[2] = {_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1)};
      for (int p = 0; p < 4; ++p) {
        const __m128i bytes = p & 1 ? _mm_srli_si128(half[p / 2], 8) : half[p / 2];
        const __m256i v = F::kSigned ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes);
        _mm256_storeu_ps(o + 8 * p, _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(gs[j].a[p / 2]),
                                                    _mm256_set1_ps(gs[j].b[p / 2])));
      }
#else
      uint8_t c[32];
      F::codes_scalar(b, j, c);
      for (int i = 0; i < 32; ++i) {
        const float code = F::kSigned ? float(int8_t(c[i])) : float(c[i]);
        o[i] = gs[j].a[i / 16] * code + gs[j].b[i / 16];
      }
#endif
    }
  }
}

}  // namespace

void dequantize_row(QuantType q, const uint8_t* row, float* out, int64_t cols) {
  with_format(q, [&](auto tag) { dequantize_row_q<decltype(tag)::value>(row, out, cols); });
}

namespace {

#if ME_AVX2
// A group's 32 codes as int16 (Format::codes16), and their dot products with 32 int16 of x: dot() 8 lanes summing
// both halves, dot_halves() half 0 (elements 0-15) and half 1 apart: madd, or VNNI's dpwssd. 256-bit only, on
// AVX-512 machines too: one 512-bit dpwssd per group instead (the previous version) measured 7-9% slower at 1-4
// rows (an Intel core runs no 256-bit vector work on port 1 while 512-bit instructions are in flight).
struct GroupCodes {
  __m256i lo, hi;
  static __m256i dot16(__m256i acc, __m256i a, const int16_t* x) {
    return dot16(acc, a, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  }
  static __m256i dot16(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpwssd_epi32(acc, a, b);
#elif defined(__AVXVNNI__)
    return _mm256_dpwssd_avx_epi32(acc, a, b);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
  }
  __m256i dot(const int16_t* x) const { return dot16(dot16(_mm256_setzero_si256(), lo, x), hi, x + 16); }
  void dot_halves(const int16_t* x, __m256i& h0, __m256i& h1) const {
    h0 = dot16(_mm256_setzero_si256(), lo, x);
    h1 = dot16(_mm256_setzero_si256(), hi, x + 16);
  }
};
#endif

// The scales of groups g .. g + n - 1 of a weight row (n <= 8), per half: a[h][j] in memory (broadcast from
// there, one group at a time) and, on AVX2, b[h] as vectors in bv (0 past n).
template <QuantType Q>
inline void chunk_scales(const uint8_t* wrow, int g, int n, float a[2][8], float b[2][8]
#if ME_AVX2
                         , __m256* bv
#endif
) {
  using F = Format<Q>;
#if ME_AVX2
  if (n == 8) {
    __m256 A[2];
    F::chunk(wrow, g, A, bv);
    // one 32-byte store each: the rows read single groups' scales back
    _mm256_store_ps(a[0], A[0]);
    _mm256_store_ps(a[1], A[1]);
    return;
  }
#endif
  GroupScales gs[F::kGroups];
  for (int j = 0; j < 8; ++j) {
    if (j >= n) {
      a[0][j] = a[1][j] = b[0][j] = b[1][j] = 0.0f;
      continue;
    }
    const uint8_t* blk = wrow + size_t((g + j) / F::kGroups) * F::kBytes;
    F::scales(blk, gs);
    const GroupScales& sc = gs[(g + j) % F::kGroups];
    for (int h = 0; h < 2; ++h) {
      a[h][j] = sc.a[h];
      b[h][j] = sc.b[h];
    }
  }
#if ME_AVX2
  for (int h = 0; h < 2; ++h)  // built in registers: a 32-byte load of 4-byte stores would not forward
    bv[h] = _mm256_setr_ps(b[h][0], b[h][1], b[h][2], b[h][3], b[h][4], b[h][5], b[h][6], b[h][7]);
#endif
}

// out[r] = W row . x row r0 + r for MR rows of x; the weight row is G groups, taken 8 (one chunk of x) at a time.
// Per group: its codes widened to int16 once, then for each row one integer dot product with x's int16 (a dpwssd
// or madd per half) and one FMA by the group's a, shared by the rows; per chunk and
// row one FMA by x's scale and one (two halves) for the b terms. No horizontal adds until the end.
template <QuantType Q, int MR>
void dot_rows(const uint8_t* wrow, int G, const XRows& x, int r0, float* out) {
  using F = Format<Q>;
  alignas(32) float a[2][8], b[2][8];
#if ME_AVX2
  __m256 accb[MR];  // the b terms
  for (int r = 0; r < MR; ++r) accb[r] = _mm256_setzero_ps();
  __m256 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
  for (int g = 0; g < G; g += 8) {
    const int n = std::min(8, G - g), c = g / 8;
    __m256 bv[2];
    chunk_scales<Q>(wrow, g, n, a, b, bv);
    for (int r = 0; r < MR; ++r) {
      const size_t at = size_t(r0 + r) * G + g;
      accb[r] = _mm256_fmadd_ps(bv[0], _mm256_loadu_ps(x.s0 + at), accb[r]);
      accb[r] = _mm256_fmadd_ps(bv[1], _mm256_loadu_ps(x.s1 + at), accb[r]);
    }
    __m256 t[MR];
    for (int r = 0; r < MR; ++r) t[r] = _mm256_setzero_ps();
    for (int j = 0; j < n; ++j) {
      GroupCodes cg;
      F::codes16(wrow + size_t((g + j) / F::kGroups) * F::kBytes, (g + j) % F::kGroups, cg.lo, cg.hi);
      const __m256 a0 = _mm256_set1_ps(a[0][j]), a1 = _mm256_set1_ps(a[1][j]);
      for (int r = 0; r < MR; ++r) {
        const int16_t* xq = x.q + (size_t(r0 + r) * G + g + j) * 32;
        if constexpr (F::kPerHalf) {
          __m256i h0, h1;
          cg.dot_halves(xq, h0, h1);
          t[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h0), a0, t[r]);
          t[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h1), a1, t[r]);
        } else {
          t[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(cg.dot(xq)), a0, t[r]);
        }
      }
    }
    for (int r = 0; r < MR; ++r) acc[r] = _mm256_fmadd_ps(t[r], _mm256_set1_ps(x.d[size_t(r0 + r) * x.C + c]), acc[r]);
  }
  for (int r = 0; r < MR; ++r) out[r] = hsum(acc[r]) + hsum(accb[r]);
#else
  uint8_t codes[32];
  float acc[MR] = {};
  for (int g = 0; g < G; g += 8) {
    const int n = std::min(8, G - g), c = g / 8;
    chunk_scales<Q>(wrow, g, n, a, b);
    float t[MR] = {};
    for (int j = 0; j < n; ++j) {
      F::codes_scalar(wrow + size_t((g + j) / F::kGroups) * F::kBytes, (g + j) % F::kGroups, codes);
      for (int r = 0; r < MR; ++r) {
        const size_t at = size_t(r0 + r) * G + g + j;
        const int16_t* xq = x.q + at * 32;
        int32_t isum[2] = {0, 0};
#if ME_NEON
        // NEON: the codes widened to int16, multiplied with x's int16 and summed in int32 lanes (vmlal, AVX2's
        // madd; the dotprod and i8mm instructions take int8 activations, ours are int16)
        for (int h = 0; h < 2; ++h) {
          const uint8x16_t c8 = vld1q_u8(codes + 16 * h);
          const int16x8_t c0 = F::kSigned ? vmovl_s8(vget_low_s8(vreinterpretq_s8_u8(c8)))
                                          : vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(c8)));
          const int16x8_t c1 = F::kSigned ? vmovl_s8(vget_high_s8(vreinterpretq_s8_u8(c8)))
                                          : vreinterpretq_s16_u16(vmovl_u8(vget_high_u8(c8)));
          const int16x8_t x0 = vld1q_s16(xq + 16 * h), x1 = vld1q_s16(xq + 16 * h + 8);
          int32x4_t v = vmull_s16(vget_low_s16(c0), vget_low_s16(x0));
          v = vmlal_high_s16(v, c0, x0);
          v = vmlal_s16(v, vget_low_s16(c1), vget_low_s16(x1));
          v = vmlal_high_s16(v, c1, x1);
          isum[h] = vaddvq_s32(v);
        }
#else
        for (int i = 0; i < 32; ++i)
          isum[i / 16] += (F::kSigned ? int32_t(int8_t(codes[i])) : int32_t(codes[i])) * int32_t(xq[i]);
#endif
        t[r] += a[0][j] * float(isum[0]) + a[1][j] * float(isum[1]);
        acc[r] += b[0][j] * x.s0[at] + b[1][j] * x.s1[at];
      }
    }
    for (int r = 0; r < MR; ++r) acc[r] += t[r] * x.d[size_t(r0 + r) * x.C + c];
  }
  for (int r = 0; r < MR; ++r) out[r] = acc[r];
#endif
}

#if ME_AVX2
// Decode (1-4 rows of x) against blocks of W rows: per chunk of 8 groups each W row's scales (times each x row's
// chunk scale) go to a small stack array and its b terms into the accumulators; per group each x row's 32 int16
// are loaded once for the block's W rows, each W row's codes widened once and dotted (dpwssd / madd) with every x
// row, one FMA into that (x row, W row)'s own accumulator; the sums by one transposing reduction per x row and 8 W
// rows. dot_rows (one W row at a time, the x rows' FMA chains through the row's groups and a reduction per W row)
// measured 1.45 ns per group at one x row (Zen 4, one thread, Q4_1, K = 576, in L1) against 1.11 here; the
// model's four matmuls of a layer, one thread: 148 us against 168 at 1 row, 200 / 246 at 2, 278 / 313 at 3, 360 /
// 379 at 4. W rows per block as measured best there (an x86-64-v3 build on the same machine: 8 for 1 row, 4 for
// 2-4, 16 accumulators spilling a little but ahead of 2 W rows).
#if defined(__AVX512F__)
constexpr int kGemvRows[5] = {0, 8, 8, 8, 4};  // W rows per block, by rows of x
#else
constexpr int kGemvRows[5] = {0, 8, 4, 4, 4};
#endif

// prefetch (into L2) the lines of [p, p + n bytes)
inline void prefetch_span(const uint8_t* p, int64_t n) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  for (uintptr_t l = a & ~uintptr_t(63); l < a + n; l += 64)
    _mm_prefetch(reinterpret_cast<const char*>(l), _MM_HINT_T1);
}

// out[m * ldo + r] = W row r . x row m0 + m for r < NR, m < MR, the W rows row_bytes apart from w; `ahead` (or
// null): the W rows read next, prefetched a chunk at a time beside the same columns of these (the rows are read
// side by side: NR streams a row apart, which the hardware prefetchers do not follow, and one burst of a block's
// lines stalls); W's bytes are readable up to `limit`.
template <QuantType Q, int NR, int MR>
void gemv_rows(const uint8_t* w, int64_t row_bytes, const XRows& x, int m0, float* out, int64_t ldo,
               const uint8_t* ahead, const uint8_t* limit) {
  using F = Format<Q>;
  constexpr int H = F::kPerHalf ? 2 : 1;  // scales per group
  const int G = x.G;
  alignas(32) float a[H][MR][NR][8];  // [half][x row][W row][group of the chunk]: a * x's chunk scale
  __m256 acc[MR][NR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
  // group g + j (j < 8) of every W row (GCC keeps acc in registers only with the loops over rows unrolled)
  auto group = [&](int g, int j) __attribute__((always_inline)) {
    __m256i x0[MR], x1[MR];
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      const int16_t* xq = x.q + (size_t(m0 + m) * G + g + j) * 32;
      x0[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
      x1[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 16));
    }
    const size_t at = size_t((g + j) / F::kGroups) * F::kBytes;
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      GroupCodes c;
      F::codes16(w + r * row_bytes + at, (g + j) % F::kGroups, c.lo, c.hi);
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) {
        if constexpr (F::kPerHalf) {
          const __m256i h0 = GroupCodes::dot16(_mm256_setzero_si256(), c.lo, x0[m]);
          const __m256i h1 = GroupCodes::dot16(_mm256_setzero_si256(), c.hi, x1[m]);
          acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h0), _mm256_broadcast_ss(&a[0][m][r][j]), acc[m][r]);
          acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h1), _mm256_broadcast_ss(&a[H - 1][m][r][j]), acc[m][r]);
        } else {
          const __m256i d = GroupCodes::dot16(GroupCodes::dot16(_mm256_setzero_si256(), c.lo, x0[m]), c.hi, x1[m]);
          acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_broadcast_ss(&a[0][m][r][j]), acc[m][r]);
        }
      }
    }
  };
  // groups g .. g + 7 of every W row: their scales times each x row's chunk scale into a, their b terms into acc;
  // the first n of them (n < 8: a row's last groups, the b terms of the rest zeroed: F::chunk read their bytes
  // past the row's end)
  auto chunk = [&](int g, int n) __attribute__((always_inline)) {
    __m256 d[MR], s0[MR], s1[MR];
    for (int m = 0; m < MR; ++m) {
      const size_t row = size_t(m0 + m);
      d[m] = _mm256_set1_ps(x.d[row * x.C + g / 8]);
      s0[m] = _mm256_loadu_ps(x.s0 + row * G + g);
      s1[m] = _mm256_loadu_ps(x.s1 + row * G + g);
      if constexpr (!F::kPerHalf) s0[m] = _mm256_add_ps(s0[m], s1[m]);  // one b for both halves
    }
    const __m256 first_n =
        _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      __m256 A[2], B[2];
      F::chunk(w + r * row_bytes, g, A, B);
      if (n < 8)
        for (int h = 0; h < H; ++h) B[h] = _mm256_and_ps(B[h], first_n);
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) {
        acc[m][r] = _mm256_fmadd_ps(B[0], s0[m], acc[m][r]);
        if constexpr (F::kPerHalf) acc[m][r] = _mm256_fmadd_ps(B[1], s1[m], acc[m][r]);
        for (int h = 0; h < H; ++h) _mm256_store_ps(a[h][m][r], _mm256_mul_ps(A[h], d[m]));
      }
    }
  };
  constexpr int64_t kChunkBytes = 8 * F::kBytes / F::kGroups;  // a chunk of 8 groups of a row
  int g = 0;
  for (; g + 8 <= G; g += 8) {
    if (ahead)
      for (int r = 0; r < NR; ++r) prefetch_span(ahead + r * row_bytes + g / 8 * kChunkBytes, kChunkBytes);
    chunk(g, 8);
    for (int j = 0; j < 8; ++j) group(g, j);
  }
  if (g < G) {  // the last groups of a row not a whole chunk (K = 576: 18 groups; formats scaled per 32 only)
    const int n = G - g;
    if (ahead)  // the rest of the rows
      for (int r = 0; r < NR; ++r)
        prefetch_span(ahead + r * row_bytes + g / 8 * kChunkBytes, row_bytes - g / 8 * kChunkBytes);
    // as a whole chunk where its 8 groups' bytes are readable (the last row's read past its end: F::chunk reads
    // within them), which all but a thread's last block are; else one by one
    if (w + (NR - 1) * row_bytes + (g / 8 + 1) * kChunkBytes <= limit) {
      chunk(g, n);
    } else {
      float b[MR][NR] = {};
      for (int r = 0; r < NR; ++r) {
        for (int j = 0; j < n; ++j) {
          GroupScales gs[F::kGroups];
          F::scales(w + r * row_bytes + size_t((g + j) / F::kGroups) * F::kBytes, gs);
          const GroupScales& sc = gs[(g + j) % F::kGroups];
          for (int m = 0; m < MR; ++m) {
            const size_t row = size_t(m0 + m);
            for (int h = 0; h < H; ++h) a[h][m][r][j] = sc.a[h] * x.d[row * x.C + g / 8];
            b[m][r] += sc.b[0] * x.s0[row * G + g + j] + sc.b[1] * x.s1[row * G + g + j];
          }
        }
      }
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
        for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_add_ps(acc[m][r], _mm256_setr_ps(b[m][r], 0, 0, 0, 0, 0, 0, 0));
    }
    for (int j = 0; j < n; ++j) group(g, j);
  }
  // (acc only ever indexed by unrolled loops: a pointer into it or a loop variable index made GCC store every
  // accumulator to the stack at every group, ~4% of the GEMV's time)
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m) {
    if constexpr (NR == 8) {
      const __m256 t[8] = {acc[m][0], acc[m][1], acc[m][2], acc[m][3], acc[m][4], acc[m][5], acc[m][6], acc[m][7]};
      _mm256_storeu_ps(out + m * ldo, hsum8(t));
    } else {
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) out[m * ldo + r] = hsum(acc[m][r]);
    }
  }
}

// y[m0 + m, n ..] for m < MR over the blocks of W rows in [n, n1) that are whole; returns where they end
template <QuantType Q, int MR>
int64_t gemv_blocks(const uint8_t* w, int64_t row_bytes, const XRows& x, int m0, float* y, int64_t ldy, int64_t n,
                    int64_t n1) {
  constexpr int NR = kGemvRows[MR];
  for (; n + NR <= n1; n += NR) {  // the next block prefetched (2 blocks ahead measured no faster)
    const uint8_t* wr = w + n * row_bytes;
    const uint8_t* next = n + 2 * NR <= n1 ? wr + NR * row_bytes : nullptr;
    gemv_rows<Q, NR, MR>(wr, row_bytes, x, m0, y + int64_t(m0) * ldy + n, ldy, next, w + n1 * row_bytes);
  }
  return n;
}
#endif

constexpr int kMaxRowsPerPass = 4;  // rows of x per decoded weight group
constexpr int kRowBlock = 64;       // rows of x per pass over the thread's W rows
constexpr int kPrefetchBytes = 4096;

// y[m0 + r, n] for r < mr (1..4), n in [n0, n1)
template <QuantType Q>
void rows_pass(const uint8_t* w, int64_t row_bytes, const XRows& x, int m0, int mr, float* y, int64_t ldy,
               int64_t n0, int64_t n1) {
  [[maybe_unused]] const uint8_t* end = w + n1 * row_bytes;
  int64_t n = n0;
#if ME_AVX2
  switch (mr) {  // whole blocks of W rows, the rest below one row at a time
    case 1: n = gemv_blocks<Q, 1>(w, row_bytes, x, m0, y, ldy, n, n1); break;
    case 2: n = gemv_blocks<Q, 2>(w, row_bytes, x, m0, y, ldy, n, n1); break;
    case 3: n = gemv_blocks<Q, 3>(w, row_bytes, x, m0, y, ldy, n, n1); break;
    default: n = gemv_blocks<Q, 4>(w, row_bytes, x, m0, y, ldy, n, n1); break;
  }
#endif
  float out[kMaxRowsPerPass];
  for (; n < n1; ++n) {
    const uint8_t* wr = w + n * row_bytes;
#if ME_AVX2
    // the thread's one stream of W, prefetched into L2 kPrefetchBytes ahead (as the float GEMV)
    for (const uint8_t* p = wr + kPrefetchBytes; p < wr + kPrefetchBytes + row_bytes && p < end; p += 64)
      _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1);
#endif
    switch (mr) {
      case 1: dot_rows<Q, 1>(wr, x.G, x, m0, out); break;
      case 2: dot_rows<Q, 2>(wr, x.G, x, m0, out); break;
      case 3: dot_rows<Q, 3>(wr, x.G, x, m0, out); break;
      default: dot_rows<Q, 4>(wr, x.G, x, m0, out); break;
    }
    for (int r = 0; r < mr; ++r) y[int64_t(m0 + r) * ldy + n] = out[r];
  }
}

// Many rows of x (prefill, large batches): W dequantized to f32 a slab of rows at a time (L2-sized, on each
// thread), each slab multiplied with every row of x by the float GEMM's register tiles (gemm_tiles.h), or its
// 512-bit panels from kPanelMinRows rows where the float matmul takes them (gemm_panels.h). The
// dequantization costs one pass per call, the tiles' FMAs dominate, and x stays unquantized.
// measured (2 threads, Q4_1, L2-resident W): integer passes 0.19 ms at 4 rows vs 0.25 dequantized; 0.37 vs 0.31 at 8
constexpr int kDequantMinRows = 6;
constexpr int kTileRowBlock = 32;    // rows of x per tile pass (as the float matmul)

template <QuantType Q>
void dequant_gemm(const float* x, int M, int K, const uint8_t* w, int64_t row_bytes, float* y, int N, int ldy,
                  ThreadPool& pool) {
  bool panels = false;  // the float matmul's 512-bit panels (gemm_panels.h) on the slabs, where it takes them
#if ME_GEMM512
  panels = M >= kPanelMinRows && gemm_wide_vectors();
#endif
  const int64_t unit = panels ? kPanelCols : kTileW;  // W rows a thread's share is made of
  const int x_rows = panels ? panel_row_chunk(K, M) : kTileRowBlock;  // rows of x per pass over a slab
  const int64_t slab_rows = std::max<int64_t>(unit, ((256 << 10) / (int64_t(K) * 4)) / unit * unit);
  pool.parallel_for((N + unit - 1) / unit, [&](int64_t b0, int64_t b1) {
    thread_local std::vector<float> slab;
    slab.resize(size_t(slab_rows) * K);
    const int64_t n_end = std::min<int64_t>(N, b1 * unit);
    for (int64_t s0 = b0 * unit; s0 < n_end; s0 += slab_rows) {
      const int64_t s1 = std::min(n_end, s0 + slab_rows);
      for (int64_t n = s0; n < s1; ++n) dequantize_row_q<Q>(w + n * row_bytes, slab.data() + (n - s0) * K, K);
      for (int m0 = 0; m0 < M; m0 += x_rows) {
        const float* xm = x + int64_t(m0) * K;
        float* ym = y + int64_t(m0) * ldy + s0;
#if ME_GEMM512
        if (panels) {
          gemm_xwt_panels(xm, std::min(x_rows, M - m0), slab.data(), ym, K, {K, K, ldy}, 0, s1 - s0);
          continue;
        }
#endif
        gemm_xwt_tiles(xm, std::min(x_rows, M - m0), slab.data(), ym, K, {K, K, ldy}, 0, s1 - s0);
      }
    }
  });
}

// x [M, K] quantized row by row (on the pool from 5 rows) into the calling thread's buffer, a scale per S groups
// (XRows: 8 for the GEMV passes, 1 for the int16 panels)
XRows quantize_rows(const float* x, int M, int K, int S, ThreadPool& pool) {
  thread_local XRowsBuffer buf;
  const XRows xq = buf.resize(M, K / 32, S);
  if (M <= kMaxRowsPerPass) {
    for (int m = 0; m < M; ++m) quantize_x_row(x + int64_t(m) * K, K, xq, m);
  } else {
    pool.parallel_for(M, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) quantize_x_row(x + m * K, K, xq, int(m));
    });
  }
  return xq;
}

template <QuantType Q>
void quant_matmul(const float* x, int M, int K, const uint8_t* w, float* y, int N, int ldy, ThreadPool& pool) {
  const int64_t row_bytes = quant_row_bytes(Q, K);
  if (M >= kDequantMinRows) {
#if ME_AMX
    static_assert(kAmxMinRows == kDequantMinRows);
    if constexpr (!Format<Q>::kPerHalf) {
      if (amx_tiles()) {
        amx::quant_matmul<Q>(x, M, K, w, row_bytes, y, N, ldy, pool);
        return;
      }
    }
#endif
#if ME_QUANT_PANELS
    bool float_panels = false;  // where the float matmul's 512-bit panels run (their own measurements), keep them
#if ME_GEMM512
    float_panels = M >= kPanelMinRows && gemm_wide_vectors();
#endif
    if (!float_panels && quant_panels()) {
      qpanel::gemm<Q>(quantize_rows(x, M, K, 1, pool), M, w, row_bytes, y, N, ldy, pool);  // a scale per group
      return;
    }
#endif
    dequant_gemm<Q>(x, M, K, w, row_bytes, y, N, ldy, pool);
    return;
  }
  const XRows xq = quantize_rows(x, M, K, 8, pool);
  if (M <= kMaxRowsPerPass) {
    pool.parallel_for(N, [&](int64_t n0, int64_t n1) { rows_pass<Q>(w, row_bytes, xq, 0, M, y, ldy, n0, n1); });
    return;
  }
  pool.parallel_for(N, [&](int64_t n0, int64_t n1) {
    for (int b0 = 0; b0 < M; b0 += kRowBlock)
      for (int m0 = b0; m0 < std::min(M, b0 + kRowBlock); m0 += kMaxRowsPerPass)
        rows_pass<Q>(w, row_bytes, xq, m0, std::min(kMaxRowsPerPass, M - m0), y, ldy, n0, n1);
  });
}

float bias_at(const void* bias, int dtype_plus_one, int n) {
  switch (dtype_plus_one) {
    case 1 + int(DType::F16): return to_float(static_cast<const f16*>(bias)[n]);
    case 1 + int(DType::BF16): return to_float(static_cast<const bf16*>(bias)[n]);
    default: return static_cast<const float*>(bias)[n];
  }
}

template <QuantType Q>
void matmul_q(const MatmulArgs& a, void* const* b, ThreadPool& pool) {
  const float* x = static_cast<const float*>(b[0]);    // [m, k]
  const uint8_t* w = static_cast<const uint8_t*>(b[1]);  // [n, k / block_elems blocks]
  const void* bias = b[2];                             // [n] f32 / f16 / bf16 (has_bias: 1 + its DType), or null
  float* y = static_cast<float*>(b[3]);                // [m, y_stride]
  quant_matmul<Q>(x, a.m, a.k, w, y, a.n, a.y_stride, pool);
  if (a.has_bias && bias)
    for (int m = 0; m < a.m; ++m)
      for (int n = 0; n < a.n; ++n) y[int64_t(m) * a.y_stride + n] += bias_at(bias, a.has_bias, n);
}

template <QuantType Q>
void embedding_q(const EmbeddingArgs& a, void* const* b, ThreadPool& pool) {
  const int32_t* ids = static_cast<const int32_t*>(b[0]);    // [num_tokens]
  const uint8_t* table = static_cast<const uint8_t*>(b[1]);  // [vocab, hidden / block_elems blocks]
  float* out = static_cast<float*>(b[2]);                    // [num_tokens, hidden]
  const int64_t row_bytes = quant_row_bytes(Q, a.hidden);
  pool.parallel_for(a.num_tokens, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* o = out + t * a.hidden;
      dequantize_row(Q, table + int64_t(ids[t]) * row_bytes, o, a.hidden);
      if (a.scale != 1.0f)
        for (int i = 0; i < a.hidden; ++i) o[i] *= a.scale;
    }
  });
}

}  // namespace

void quant_matmul_rows(QuantType q, const float* x, int M, int K, const uint8_t* w, float* y, int N,
                       ThreadPool& pool) {
  with_format(q, [&](auto tag) { quant_matmul<decltype(tag)::value>(x, M, K, w, y, N, N, pool); });
}

void add_quant_matmul_kernels(std::vector<KernelDef>& table) {
  for (QuantType q : quant_types()) {
    const std::string name = quant_info(q).name;
    with_format(q, [&](auto tag) {
      constexpr QuantType Q = decltype(tag)::value;
      table.push_back(make_kernel<MatmulArgs>("matmul_" + name, 4, matmul_q<Q>));
      table.push_back(make_kernel<EmbeddingArgs>("embedding_" + name, 3, embedding_q<Q>));
    });
  }
}

}  // namespace metal_engine::cpu
