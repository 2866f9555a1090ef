// The quantized weight formats on the cpu backend (include/metal_engine/quant.h): each format's block read as
// groups of 32 weights, w[i] = a[h] * code[i] + b[h] for the group's halves h = i / 16, the codes unsigned
// (signed for Q8_0). The matmul kernels take each activation row quantized once to int16 in groups of 32
// (XRows) and compute each group's dot product in integers: sum(code * xq) * a * xd + b * sum(xq) * xd.
// Layouts as ggml-common.h (little-endian; f16 = IEEE half bits); the tests check every format's
// dequantization against gguf-py's.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "metal_engine/quant.h"
#include "simd.h"
#include "thread_pool.h"

namespace metal_engine::cpu {

inline float f16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#if ME_AVX2
  return _cvtsh_ss(h);
#elif ME_NEON
  __fp16 f;
  std::memcpy(&f, &h, 2);
  return float(f);
#else
  return half_to_float(h);
#endif
}

// Rows of activations quantized to int16, one scale per chunk of S groups of 32 (S = 8, 256 weights: the GEMV's
// step; S = 1 for the batched kernels of gemm_quant_panels.h, whose prefill rows then stay float-like too):
// x[r, 32 g + i] ~ d[r, g / S] * q[r, g, i] (|q| <= 32767: a rounding of ~1.5e-5 of the chunk's largest value,
// float-like logits where llama.cpp's int8 activations move them by ~1), and per half of each group
// s0 / s1 [r, g] = d * sum(q[r, g, 0..15]) / (16..31) for the formats' b terms.
struct XRows {
  int G = 0;                   // groups per row (K / 32)
  int C = 0;                   // chunks per row (ceil(G / S))
  int S = 8;                   // groups per chunk
  const int16_t* q = nullptr;  // [M, G, 32]
  const float* d = nullptr;    // [M, C]
  const float* s0 = nullptr;   // [M, G] (+ 8 readable floats past the last row)
  const float* s1 = nullptr;   // [M, G] (+ 8)
};

// The storage behind an XRows (one per thread that quantizes, reused between calls).
struct XRowsBuffer {
  std::vector<int16_t> q;
  std::vector<float> d, s0, s1;
  XRows resize(int M, int G, int S = 8) {
    const int C = (G + S - 1) / S;
    q.resize(size_t(M) * G * 32);
    d.resize(size_t(M) * C);
    s0.assign(size_t(M) * G + 8, 0.0f);
    s1.assign(size_t(M) * G + 8, 0.0f);
    return XRows{G, C, S, q.data(), d.data(), s0.data(), s1.data()};
  }
};

// Row r of x [K] (K a multiple of 32) into rows' row r.
void quantize_x_row(const float* x, int K, const XRows& rows, int r);

// A group's affine terms per half (equal halves for the formats scaled per 32).
struct GroupScales {
  float a[2];
  float b[2];
};

// K-quants' 6-bit scale and min of sub-block j (0..7) from their 12 packed bytes (ggml get_scale_min_k4).
inline void k_scale_min(const uint8_t* s, int j, int& sc, int& m) {
  if (j < 4) {
    sc = s[j] & 63;
    m = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

#if ME_AVX2
// ---- 8 groups at a time (the matmul's inner loop): the scales of groups g .. g + 7 of a row, lane j for group
// g + j, as A[h], B[h] for half h (16 weights) of each group (A[0] == A[1] but for Q6_K).

// 8 f16 values `stride` bytes apart -> f32
inline __m256 f16x8_strided(const uint8_t* p, int stride) {
  auto u = [&](int i) {
    uint16_t v;
    std::memcpy(&v, p + i * stride, 2);
    return int(v);
  };
  __m128i h = _mm_cvtsi32_si128(u(0));
  h = _mm_insert_epi16(h, u(1), 1);
  h = _mm_insert_epi16(h, u(2), 2);
  h = _mm_insert_epi16(h, u(3), 3);
  h = _mm_insert_epi16(h, u(4), 4);
  h = _mm_insert_epi16(h, u(5), 5);
  h = _mm_insert_epi16(h, u(6), 6);
  h = _mm_insert_epi16(h, u(7), 7);
  return _mm256_cvtph_ps(h);
}
// one scale for both halves of each group
inline void both_halves(__m256 v, __m256* out) { out[0] = out[1] = v; }
// The 32-bit words at the starts of 8 blocks kBytes apart (Q4_1 / Q5_1 / A8 / A6: d | m as f16 each). Q4_1 on
// AVX-512VL: blocks 0-3 and 4-7 each in two 32-byte loads (within the 8 blocks), their words picked by one
// two-source permute each (256-bit: 512-bit instructions here would slow the GEMV's other 256-bit ones); else 8
// inserts (a gather measured slower still).
template <int kBytes>
inline __m256i block_words8(const uint8_t* p) {
#if defined(__AVX512F__) && defined(__AVX512VL__)
  if constexpr (kBytes % 4 == 0 && kBytes >= 16 && 3 * kBytes < 64) {  // Q4_1
    constexpr int s = kBytes / 4;
    auto ld = [&](int off) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + off)); };
    const __m256i i0 = _mm256_setr_epi32(0, s, 2 * s, 3 * s, 0, 0, 0, 0);
    const __m256i i1 = _mm256_setr_epi32(0, 0, 0, 0, 0, s, 2 * s, 3 * s);
    const __m256i q0 = _mm256_permutex2var_epi32(ld(0), i0, ld(32));
    const __m256i q1 = _mm256_permutex2var_epi32(ld(4 * kBytes), i1, ld(4 * kBytes + 32));
    return _mm256_blend_epi32(q0, q1, 0xF0);
  }
#endif
  auto u = [&](int i) {
    int v;
    std::memcpy(&v, p + i * kBytes, 4);
    return v;
  };
  __m128i lo = _mm_cvtsi32_si128(u(0)), hi = _mm_cvtsi32_si128(u(4));
  lo = _mm_insert_epi32(lo, u(1), 1);
  hi = _mm_insert_epi32(hi, u(5), 1);
  lo = _mm_insert_epi32(lo, u(2), 2);
  hi = _mm_insert_epi32(hi, u(6), 2);
  lo = _mm_insert_epi32(lo, u(3), 3);
  hi = _mm_insert_epi32(hi, u(7), 3);
  return _mm256_set_m128i(hi, lo);
}
// The formats scaled per 32-weight block: d (and m at m_offset 2, else b = b_of_d * d) of 8 blocks. Q4_1 / Q5_1:
// d | m as the 32-bit word at each block's start (block_words8), then split (not 16 of 16 bits: inserts are the
// GEMV's bottleneck).
template <int kBytes, int kMOffset, int kBOfD>
inline void block32_chunk(const uint8_t* row, int g, __m256* A, __m256* B) {
  static_assert(kMOffset == -1 || kMOffset == 2, "m follows d");
  const uint8_t* p = row + size_t(g) * kBytes;
  if constexpr (kMOffset < 0) {
    const __m256 d = f16x8_strided(p, kBytes);
    both_halves(d, A);
    both_halves(_mm256_mul_ps(d, _mm256_set1_ps(float(kBOfD))), B);
  } else {
    const __m256i dm = block_words8<kBytes>(p);
#if defined(__AVX512F__) && defined(__AVX512VL__)
    // d and m by a truncating vpmovdw each (the GEMV ~3-6% faster than by the pack and permute below)
    both_halves(_mm256_cvtph_ps(_mm256_cvtepi32_epi16(dm)), A);
    both_halves(_mm256_cvtph_ps(_mm256_cvtepi32_epi16(_mm256_srli_epi32(dm, 16))), B);
#else
    // [d0..3, m0..3 | d4..7, m4..7] as u16, then [d0..7 | m0..7]
    const __m256i halves = _mm256_permute4x64_epi64(
        _mm256_packus_epi32(_mm256_and_si256(dm, _mm256_set1_epi32(0xFFFF)), _mm256_srli_epi32(dm, 16)), 0xD8);
    both_halves(_mm256_cvtph_ps(_mm256_castsi256_si128(halves)), A);
    both_halves(_mm256_cvtph_ps(_mm256_extracti128_si256(halves, 1)), B);
#endif
  }
}
// Q4_K / Q5_K: the 8 sub-blocks' 6-bit scales and mins of super-block g / 8, unpacked 4 at a time from the 12 bytes
inline void k4_chunk(const uint8_t* b, __m256* A, __m256* B) {
  const float d = f16_at(b), dmin = f16_at(b + 2);
  uint32_t u[3];
  std::memcpy(u, b + 4, 12);
  const uint32_t sc03 = u[0] & 0x3f3f3f3f, m03 = u[1] & 0x3f3f3f3f;
  const uint32_t sc47 = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
  const uint32_t m47 = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
  const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, int(sc47), int(sc03))));
  const __m256 m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, int(m47), int(m03))));
  both_halves(_mm256_mul_ps(sc, _mm256_set1_ps(d)), A);
  both_halves(_mm256_mul_ps(m, _mm256_set1_ps(-dmin)), B);
}
#endif

#if ME_AVX2
// A group's 32 codes as int16 for the integer dot products: codes 0-15 in lo, 16-31 in hi. From a vector of the
// 32 codes (u8, or i8 when signed) by default; the nibble and byte formats widen straight from memory instead
// (one vpmovzxbw per half, no byte shuffles: the GEMV's shuffle port is its bottleneck).
template <bool kSigned>
inline void widen_codes(__m256i codes, __m256i& lo, __m256i& hi) {
  const __m128i a = _mm256_castsi256_si128(codes), b = _mm256_extracti128_si256(codes, 1);
  lo = kSigned ? _mm256_cvtepi8_epi16(a) : _mm256_cvtepu8_epi16(a);
  hi = kSigned ? _mm256_cvtepi8_epi16(b) : _mm256_cvtepu8_epi16(b);
}
template <bool kSigned>
inline __m256i bytes16(const uint8_t* p) {  // 16 bytes -> 16 int16
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return kSigned ? _mm256_cvtepi8_epi16(v) : _mm256_cvtepu8_epi16(v);
}
#endif

// Per format: kGroups groups of 32 per block; scales(block, GroupScales[kGroups]); codes_scalar(block, j, out)
// the 32 codes of group j; on AVX2 codes(block, j) the same as one vector and chunk(row, g, A, B) the scales of
// the row's groups g .. g + 7 (g a multiple of 8; see block32_chunk). kSigned: codes are int8 (Q8_0).
// kPerHalf: the halves of a group have their own scales (Q6_K's 16-weight sub-blocks).
template <QuantType Q>
struct Format;

template <>
struct Format<QuantType::Q8_0> {  // f16 d; i8 qs[32]                 w = d * q
  static constexpr int kGroups = 1, kBytes = 34;
  static constexpr bool kSigned = true, kPerHalf = false;
  static void scales(const uint8_t* b, GroupScales* g) { g[0] = {{f16_at(b), f16_at(b)}, {0, 0}}; }
  static void codes_scalar(const uint8_t* b, int, uint8_t* out) { std::memcpy(out, b + 2, 32); }
#if ME_AVX2
  static void chunk(const uint8_t* row, int g, __m256* A, __m256* B) { block32_chunk<34, -1, 0>(row, g, A, B); }
  static __m256i codes(const uint8_t* b, int) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2)); }
  static void codes16(const uint8_t* b, int, __m256i& lo, __m256i& hi) {
    lo = bytes16<true>(b + 2);
    hi = bytes16<true>(b + 18);
  }
#endif
};

// Q4_0 / Q4_1: byte i of qs holds weight i (low nibble) and weight i + 16 (high nibble).
inline void nibbles_scalar(const uint8_t* qs, uint8_t* out) {
  for (int i = 0; i < 16; ++i) {
    out[i] = qs[i] & 0xF;
    out[i + 16] = qs[i] >> 4;
  }
}
#if ME_AVX2
inline __m256i nibbles(const uint8_t* qs) {
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i m = _mm_set1_epi8(0xF);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m), _mm_and_si128(q, m));
}
// Q4_0 / Q4_1 order (byte i: weight i low, weight i + 16 high): word i = byte i, then its low and high nibble
inline void nibbles16(const uint8_t* qs, __m256i& lo, __m256i& hi) {
  const __m256i w = bytes16<false>(qs);
  lo = _mm256_and_si256(w, _mm256_set1_epi16(0xF));
  hi = _mm256_srli_epi16(w, 4);
}
// byte i = 0x10 where bit i of x is set (the fifth bit of Q5_0 / Q5_1)
inline __m256i fifth_bits(uint32_t x) {
  __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(int(x)),
                                  _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
  const __m256i bit = _mm256_set1_epi64x(int64_t(0x8040201008040201ULL));
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit), _mm256_set1_epi8(0x10));
}
#endif

template <>
struct Format<QuantType::Q4_0> {  // f16 d; u8 qs[16]                 w = d * (q - 8)
  static constexpr int kGroups = 1, kBytes = 18;
  static constexpr bool kSigned = false, kPerHalf = false;
  static void scales(const uint8_t* b, GroupScales* g) {
    const float d = f16_at(b);
    g[0] = {{d, d}, {-8 * d, -8 * d}};
  }
  static void codes_scalar(const uint8_t* b, int, uint8_t* out) { nibbles_scalar(b + 2, out); }
#if ME_AVX2
  static void chunk(const uint8_t* row, int g, __m256* A, __m256* B) { block32_chunk<18, -1, -8>(row, g, A, B); }
  static __m256i codes(const uint8_t* b, int) { return nibbles(b + 2); }
  static void codes16(const uint8_t* b, int, __m256i& lo, __m256i& hi) { nibbles16(b + 2, lo, hi); }
#endif
};

template <>
struct Format<QuantType::Q4_1> {  // f16 d, m; u8 qs[16]              w = d * q + m
  static constexpr int kGroups = 1, kBytes = 20;
  static constexpr bool kSigned = false, kPerHalf = false;
  static void scales(const uint8_t* b, GroupScales* g) {
    const float d = f16_at(b), m = f16_at(b + 2);
    g[0] = {{d, d}, {m, m}};
  }
  static void codes_scalar(const uint8_t* b, int, uint8_t* out) { nibbles_scalar(b + 4, out); }
#if ME_AVX2
  static void chunk(const uint8_t* row, int g, __m256* A, __m256* B) { block32_chunk<20, 2, 0>(row, g, A, B); }
  static __m256i codes(const uint8_t* b, int) { return nibbles(b + 4); }
  static void codes16(const uint8_t* b, int, __m256i& lo, __m256i& hi) { nibbles16(b + 4, lo, hi); }
#endif
};

inline void fifth_bits_scalar(const uint8_t* qh, uint8_t* out) {
  uint32_t h;
  std::memcpy(&h, qh, 4);
  for (int i = 0; i < 32; ++i) out[i] |= uint8_t(((h >> i) & 1) << 4);
}

#if ME_AVX2 && defined(__AVX512BW__) && defined(__AVX512VL__)
#define ME_FIFTH_BITS16 1
// Q5_0 / Q5_1 as int16 on AVX-512BW (codes16): the nibbles widened as Q4_0's, then the fifth bits (qh, bit i for
// weight i) added into the words (nibbles < 16: an or) by two masked adds with qh as the masks. (From codes(), the
// byte shuffles of fifth_bits and the widening after them took twice Q4_1's time per group in the GEMV.)
inline void fifth_bits16(const uint8_t* qh, const uint8_t* qs, __m256i& lo, __m256i& hi) {
  uint32_t h;
  std::memcpy(&h, qh, 4);
  nibbles16(qs, lo, hi);
  const __m256i bit4 = _mm256_set1_epi16(0x10);
  lo = _mm256_mask_add_epi16(lo, __mmask16(h & 0xFFFF), lo, bit4);
  hi = _mm256_mask_add_epi16(hi, __mmask16(h >> 16), hi, bit4);
}
#endif

template <>
struct Format<QuantType::Q5_0> {  // f16 d; u8 qh[4]; u8 qs[16]       w = d * (q - 16), bit i of qh: q[i]'s fifth
  static constexpr int kGroups = 1, kBytes = 22;
  static constexpr bool kSigned = false, kPerHalf = false;
  static void scales(const uint8_t* b, GroupScales* g) {
    const float d = f16_at(b);
    g[0] = {{d, d}, {-16 * d, -16 * d}};
  }
  static void codes_scalar(const uint8_t* b, int, uint8_t* out) {
    nibbles_scalar(b + 6, out);
    fifth_bits_scalar(b + 2, out);
  }
#if ME_AVX2
  static void chunk(const uint8_t* row, int g, __m256* A, __m256* B) { block32_chunk<22, -1, -16>(row, g, A, B); }
  static __m256i codes(const uint8_t* b, int) {
    uint32_t h;
    std::memcpy(&h, b + 2, 4);
    return _mm256_or_si256(nibbles(b + 6), fifth_bits(h));
  }
#if ME_FIFTH_BITS16
  static void codes16(const uint8_t* b, int, __m256i& lo, __m256i& hi) { fifth_bits16(b + 2, b + 6, lo, hi); }
#else
  static void codes16(const uint8_t* b, int j, __m256i& lo, __m256i& hi) { widen_codes<kSigned>(codes(b, j), lo, hi); }
#endif
#endif
};

template <>
struct Format<QuantType::Q5_1> {  // f16 d, m; u8 qh[4]; u8 qs[16]    w = d * q + m
  static constexpr int kGroups = 1, kBytes = 24;
  static constexpr bool kSigned = false, kPerHalf = false;
  static void scales(const uint8_t* b, GroupScales* g) {
    const float d = f16_at(b), m = f16_at(b + 2);
    g[0] = {{d, d}, {m, m}};
  }
  static void codes_scalar(const uint8_t* b, int, uint8_t* out) {
    nibbles_scalar(b + 8, out);
    fifth_bits_scalar(b + 4, out);
  }
#if ME_AVX2
  static void chunk(const uint8_t* row, int g, __m256* A, __m256* B) { block32_chunk<24, 2, 0>(row, g, A, B); }
  static __m256i codes(const uint8_t* b, int) {
    uint32_t h;
    std::memcpy(&h, b + 4, 4);
    return _mm256_or_si256(nibbles(b + 8), fifth_bits(h));
  }
#if ME_FIFTH_BITS16
  static void codes16(const uint8_t* b, int, __m256i& lo, __m256i& hi) { fifth_bits16(b + 4, b + 8, lo, hi); }
#else
  static void codes16(const uint8_t* b, int j, __m256i& lo, __m256i& hi) { widen_codes<kSigned>(codes(b, j), lo, hi); }
#endif
#endif
};

// Q4_K / Q5_K: sub-block j (32 weights) is the low (j even) or high (j odd) nibbles of qs[32 (j / 2) ..];
// w = d * sc[j] * q - dmin * m[j]. Q5_K's fifth bit of weight i of sub-block j: bit j of qh[i].
inline void k4_scales(const uint8_t* b, GroupScales* g) {
  const float d = f16_at(b), dmin = f16_at(b + 2);
  for (int j = 0; j < 8; ++j) {
    int sc, m;
    k_scale_min(b + 4, j, sc, m);
    g[j] = {{d * float(sc), d * float(sc)}, {-dmin * float(m), -dmin * float(m)}};
  }
}
inline void k4_nibbles_scalar(const uint8_t* qs, int j, uint8_t* out) {
  const uint8_t* q = qs + 32 * (j / 2);
  for (int i = 0; i < 32; ++i) out[i] = (j & 1) ? q[i] >> 4 : q[i] & 0xF;
}
#if ME_AVX2
inline __m256i k4_nibbles(const uint8_t* qs, int j) {
  __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * (j / 2)));
  if (j & 1) q = _mm256_srli_epi16(q, 4);
  return _mm256_and_si256(q, _mm256_set1_epi8(0xF));
}
#endif

template <>
struct Format<QuantType::Q4_K> {  // f16 d, dmin; u8 scales[12]; u8 qs[128]
  static constexpr int kGroups = 8, kBytes = 144;
  static constexpr bool kSigned = false, kPerHalf = false;
  static void scales(const uint8_t* b, GroupScales* g) { k4_scales(b, g); }
  static void codes_scalar(const uint8_t* b, int j, uint8_t* out) { k4_nibbles_scalar(b + 16, j, out); }
#if ME_AVX2
  static void chunk(const uint8_t* row, int g, __m256* A, __m256* B) { k4_chunk(row + size_t(g / 8) * kBytes, A, B); }
  static __m256i codes(const uint8_t* b, int j) { return k4_nibbles(b + 16, j); }
  static void codes16(const uint8_t* b, int j, __m256i& lo, __m256i& hi) {  // words of the 32 bytes, one nibble
    const uint8_t* q = b + 16 + 32 * (j / 2);
    lo = bytes16<false>(q);
    hi = bytes16<false>(q + 16);
    if (j & 1) {
      lo = _mm256_srli_epi16(lo, 4);
      hi = _mm256_srli_epi16(hi, 4);
    } else {
      lo = _mm256_and_si256(lo, _mm256_set1_epi16(0xF));
      hi = _mm256_and_si256(hi, _mm256_set1_epi16(0xF));
    }
  }
#endif
};

template <>
struct Format<QuantType::Q5_K> {  // f16 d, dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]
  static constexpr int kGroups = 8, kBytes = 176;
  static constexpr bool kSigned = false, kPerHalf = false;
  static void scales(const uint8_t* b, GroupScales* g) { k4_scales(b, g); }
  static void codes_scalar(const uint8_t* b, int j, uint8_t* out) {
    k4_nibbles_scalar(b + 48, j, out);
    for (int i = 0; i < 32; ++i) out[i] |= uint8_t(((b[16 + i] >> j) & 1) << 4);
  }
#if ME_AVX2
  static void chunk(const uint8_t* row, int g, __m256* A, __m256* B) { k4_chunk(row + size_t(g / 8) * kBytes, A, B); }
  static __m256i codes(const uint8_t* b, int j) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16));
    const __m256i bit = _mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(j)), _mm256_set1_epi8(1));
    return _mm256_or_si256(k4_nibbles(b + 48, j), _mm256_slli_epi16(bit, 4));
  }
  static void codes16(const uint8_t* b, int j, __m256i& lo, __m256i& hi) { widen_codes<kSigned>(codes(b, j), lo, hi); }
#endif
};

// Q6_K: 256 weights in two halves of 128; in half n, sub-group t (0..3) of 32: weight l is the low (t < 2) or
// high nibble of ql[64 n + 32 (t & 1) + l] and bits 2t, 2t + 1 of qh[32 n + l] above it; w = d * sc * (q - 32)
// with sc = scales[8 n + 2 t + l / 16] (a scale per 16 weights).
template <>
struct Format<QuantType::Q6_K> {  // u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d
  static constexpr int kGroups = 8, kBytes = 210;
  static constexpr bool kSigned = false, kPerHalf = true;
  static void scales(const uint8_t* b, GroupScales* g) {
    const float d = f16_at(b + 208);
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    for (int j = 0; j < 8; ++j) {
      const int n = j / 4, t = j % 4;
      for (int h = 0; h < 2; ++h) {
        const float a = d * float(sc[8 * n + 2 * t + h]);
        g[j].a[h] = a;
        g[j].b[h] = -32 * a;
      }
    }
  }
  static void codes_scalar(const uint8_t* b, int j, uint8_t* out) {
    const int n = j / 4, t = j % 4;
    const uint8_t* ql = b + 64 * n + 32 * (t & 1);
    const uint8_t* qh = b + 128 + 32 * n;
    for (int l = 0; l < 32; ++l)
      out[l] = uint8_t(((t < 2 ? ql[l] & 0xF : ql[l] >> 4)) | (((qh[l] >> (2 * t)) & 3) << 4));
  }
#if ME_AVX2
  static void chunk(const uint8_t* row, int g, __m256* A, __m256* B) {  // scales[8 n + 2 t + h] for group 4 n + t
    const uint8_t* b = row + size_t(g / 8) * kBytes;
    const __m256 d = _mm256_set1_ps(f16_at(b + 208));
    const __m128i sc = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192)),
                                        _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
    A[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc)), d);                     // half 0
    A[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8))), d);  // half 1
    B[0] = _mm256_mul_ps(A[0], _mm256_set1_ps(-32.0f));
    B[1] = _mm256_mul_ps(A[1], _mm256_set1_ps(-32.0f));
  }
  static __m256i codes(const uint8_t* b, int j) {
    const int n = j / 4, t = j % 4;
    __m256i l = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * n + 32 * (t & 1)));
    if (t >= 2) l = _mm256_srli_epi16(l, 4);
    l = _mm256_and_si256(l, _mm256_set1_epi8(0xF));
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * n));
    const __m256i hb = _mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(2 * t)), _mm256_set1_epi8(3));
    return _mm256_or_si256(l, _mm256_slli_epi16(hb, 4));
  }
  static void codes16(const uint8_t* b, int j, __m256i& lo, __m256i& hi) { widen_codes<kSigned>(codes(b, j), lo, hi); }
#endif
};


template <>
struct Format<QuantType::A8> {  // f16 d, m; u8 qs[32]               w = d * q + m (MLX 8-bit)
  static constexpr int kGroups = 1, kBytes = 36;
  static constexpr bool kSigned = false, kPerHalf = false;
  static void scales(const uint8_t* b, GroupScales* g) {
    const float d = f16_at(b), m = f16_at(b + 2);
    g[0] = {{d, d}, {m, m}};
  }
  static void codes_scalar(const uint8_t* b, int, uint8_t* out) { std::memcpy(out, b + 4, 32); }
#if ME_AVX2
  static void chunk(const uint8_t* row, int g, __m256* A, __m256* B) { block32_chunk<36, 2, 0>(row, g, A, B); }
  static __m256i codes(const uint8_t* b, int) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 4)); }
  static void codes16(const uint8_t* b, int, __m256i& lo, __m256i& hi) {
    lo = bytes16<false>(b + 4);
    hi = bytes16<false>(b + 20);
  }
#endif
};

// A6: byte i of ql holds weight i's and weight i + 16's low 4 bits (as Q4_1); bits 2t, 2t + 1 of qh[l] are weight
// 8 t + l's top two.
template <>
struct Format<QuantType::A6> {  // f16 d, m; u8 ql[16]; u8 qh[8]     w = d * q + m (MLX 6-bit)
  static constexpr int kGroups = 1, kBytes = 28;
  static constexpr bool kSigned = false, kPerHalf = false;
  static void scales(const uint8_t* b, GroupScales* g) {
    const float d = f16_at(b), m = f16_at(b + 2);
    g[0] = {{d, d}, {m, m}};
  }
  static void codes_scalar(const uint8_t* b, int, uint8_t* out) {
    nibbles_scalar(b + 4, out);
    for (int i = 0; i < 32; ++i) out[i] |= uint8_t(((b[20 + i % 8] >> (2 * (i / 8))) & 3) << 4);
  }
#if ME_AVX2
  static void chunk(const uint8_t* row, int g, __m256* A, __m256* B) { block32_chunk<28, 2, 0>(row, g, A, B); }
  static __m256i codes(const uint8_t* b, int) {
    int64_t h;
    std::memcpy(&h, b + 20, 8);
    // qh in each 64-bit lane t, shifted right by 2t: byte l's low two bits are then weight 8 t + l's top bits (a
    // shift under 8 keeps them within the byte)
    const __m256i top = _mm256_and_si256(_mm256_srlv_epi64(_mm256_set1_epi64x(h), _mm256_setr_epi64x(0, 2, 4, 6)),
                                         _mm256_set1_epi8(3));
    return _mm256_or_si256(nibbles(b + 4), _mm256_slli_epi16(top, 4));
  }
  static void codes16(const uint8_t* b, int j, __m256i& lo, __m256i& hi) { widen_codes<kSigned>(codes(b, j), lo, hi); }
#endif
};

// Calls f(std::integral_constant<QuantType, Q>{}) for the runtime format q (a kernel per format, one template).
template <class F>
void with_format(QuantType q, F&& f) {
  using Q = QuantType;
  switch (q) {
    case Q::Q8_0: f(std::integral_constant<Q, Q::Q8_0>{}); break;
    case Q::Q4_0: f(std::integral_constant<Q, Q::Q4_0>{}); break;
    case Q::Q4_1: f(std::integral_constant<Q, Q::Q4_1>{}); break;
    case Q::Q5_0: f(std::integral_constant<Q, Q::Q5_0>{}); break;
    case Q::Q5_1: f(std::integral_constant<Q, Q::Q5_1>{}); break;
    case Q::Q4_K: f(std::integral_constant<Q, Q::Q4_K>{}); break;
    case Q::Q5_K: f(std::integral_constant<Q, Q::Q5_K>{}); break;
    case Q::Q6_K: f(std::integral_constant<Q, Q::Q6_K>{}); break;
    case Q::A8: f(std::integral_constant<Q, Q::A8>{}); break;
    case Q::A6: f(std::integral_constant<Q, Q::A6>{}); break;
    case Q::None: break;
  }
}

// row [cols / block_elems blocks] -> f32 [cols]
void dequantize_row(QuantType q, const uint8_t* row, float* out, int64_t cols);

// y [M, N] = x [M, K] @ W^T for W [N, K] in format q (rows of quant_row_bytes(q, K) bytes), on the pool.
void quant_matmul_rows(QuantType q, const float* x, int M, int K, const uint8_t* w, float* y, int N,
                       ThreadPool& pool);

}  // namespace metal_engine::cpu
