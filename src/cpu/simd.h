// Element types and SIMD helpers of the cpu kernels: AVX2 + FMA + F16C on x86-64, NEON on arm64,
// plain C++ elsewhere. Weights and KV may be f32, f16 or bf16; activations and accumulation are f32.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../core/half.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define ME_AVX2 1
#include <immintrin.h>
#elif defined(__aarch64__) && defined(__ARM_NEON)
#define ME_NEON 1
#include <arm_neon.h>
#endif

namespace metal_engine::cpu {

struct f16 { uint16_t bits; };
struct bf16 { uint16_t bits; };

inline float to_float(float x) { return x; }
inline float to_float(f16 x) { return half_to_float(x.bits); }
inline float to_float(bf16 x) { return bf16_to_float(x.bits); }
inline void store_float(float* p, float x) { *p = x; }
inline void store_float(f16* p, float x) { p->bits = float_to_half(x); }
inline void store_float(bf16* p, float x) { p->bits = float_to_bf16(x); }

#if ME_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const f16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load8(const bf16* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(f16* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
inline void store8(bf16* p, __m256 v) {  // round to nearest even, like float_to_bf16 (finite inputs)
  __m256i u = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
  u = _mm256_srli_epi32(u, 16);
  __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
// e^x for 8 floats: range reduction x = n ln2 + r, |r| <= ln2/2, then a degree-6 polynomial for e^r
// (relative error about 2e-7, like expf). Inputs below -87.3 give 0, above 88.7 give +inf.
inline __m256 exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.7f), lo = _mm256_set1_ps(-87.3f);
  const __m256 over = _mm256_cmp_ps(x, hi, _CMP_GT_OQ), under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 split in two for precision
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), over);
  return _mm256_andnot_ps(under, y);
}

// {sum(a[0]), sum(a[1]), ..., sum(a[7])}: eight horizontal sums in one vector.
inline __m256 hsum8(const __m256 a[8]) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // per 128-bit lane: rows 0-3, 4-7
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#elif ME_NEON
inline float32x4_t load4(const float* p) { return vld1q_f32(p); }
inline float32x4_t load4(const f16* p) {
  return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p))));
}
inline float32x4_t load4(const bf16* p) {
  return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p)), 16));
}
#endif

// sum_i x[i] * w[i]
template <class W>
inline float dot(const float* x, const W* w, int n) {
  int i = 0;
  float s = 0.f;
#if ME_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    a0 = _mm256_fmadd_ps(load8(x + i), load8(w + i), a0);
    a1 = _mm256_fmadd_ps(load8(x + i + 8), load8(w + i + 8), a1);
  }
  for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(load8(x + i), load8(w + i), a0);
  s = hsum(_mm256_add_ps(a0, a1));
#elif ME_NEON
  float32x4_t a0 = vdupq_n_f32(0.f), a1 = vdupq_n_f32(0.f);
  for (; i + 8 <= n; i += 8) {
    a0 = vfmaq_f32(a0, vld1q_f32(x + i), load4(w + i));
    a1 = vfmaq_f32(a1, vld1q_f32(x + i + 4), load4(w + i + 4));
  }
  for (; i + 4 <= n; i += 4) a0 = vfmaq_f32(a0, vld1q_f32(x + i), load4(w + i));
  s = vaddvq_f32(vaddq_f32(a0, a1));
#endif
  for (; i < n; ++i) s += x[i] * to_float(w[i]);
  return s;
}

// y[i] += a * v[i]
template <class V>
inline void axpy(float a, const V* v, float* y, int n) {
  int i = 0;
#if ME_AVX2
  __m256 va = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8) store8(y + i, _mm256_fmadd_ps(va, load8(v + i), load8(y + i)));
#elif ME_NEON
  float32x4_t va = vdupq_n_f32(a);
  for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_f32(vld1q_f32(y + i), va, load4(v + i)));
#endif
  for (; i < n; ++i) y[i] += a * to_float(v[i]);
}

// x[i] = exp(x[i] * scale - shift) for i < n; returns the sum (softmax numerators).
inline float exp_scaled_sum(float* x, int n, float scale, float shift) {
  int i = 0;
  float sum = 0.f;
#if ME_AVX2
  const __m256 vs = _mm256_set1_ps(scale), vm = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(x + i), vs, vm));
    _mm256_storeu_ps(x + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum(acc);
#endif
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] * scale - shift);
    sum += x[i];
  }
  return sum;
}

// dst[i] = (T) src[i]
template <class T>
inline void convert_from_f32(const float* src, T* dst, int n) {
  int i = 0;
#if ME_AVX2
  for (; i + 8 <= n; i += 8) store8(dst + i, load8(src + i));
#endif
  for (; i < n; ++i) store_float(dst + i, src[i]);
}

// dst[i] = (float) src[i]
template <class T>
inline void convert_to_f32(const T* src, float* dst, int n) {
  int i = 0;
#if ME_AVX2
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8(src + i));
#elif ME_NEON
  for (; i + 4 <= n; i += 4) vst1q_f32(dst + i, load4(src + i));
#endif
  for (; i < n; ++i) dst[i] = to_float(src[i]);
}

}  // namespace metal_engine::cpu
