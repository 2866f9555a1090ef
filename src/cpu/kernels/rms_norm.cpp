// rms_norm_<wdt>: optionally residual += x, then out = residual * rsqrt(mean(residual^2) + eps) * weight
#include "../cpu_kernels.h"

namespace metal_engine::cpu {

template <class W>
static void rms_norm(const RmsNormArgs& a, void* const* b, ThreadPool& pool) {
  const float* x = static_cast<const float*>(b[0]);  // [rows, dim]
  float* residual = static_cast<float*>(b[1]);       // [rows, dim] or null
  const W* w = static_cast<const W*>(b[2]);          // [dim]
  float* out = static_cast<float*>(b[3]);            // [rows, dim], may alias x
  const int d = a.dim;
  pool.parallel_for(a.rows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * d;
      float* src = const_cast<float*>(xr);
      int i = 0;
      if (a.add_residual) {
        src = residual + r * d;
#if ME_AVX2
        for (; i + 8 <= d; i += 8) _mm256_storeu_ps(src + i, _mm256_add_ps(load8(src + i), load8(xr + i)));
#endif
        for (; i < d; ++i) src[i] += xr[i];
      }
      const float ss = dot(src, src, d);
      const float inv = 1.0f / std::sqrt(ss / float(d) + a.eps);
      float* o = out + r * d;
      i = 0;
#if ME_AVX2  // the weight widened 8 at a time (F16C for f16); the same two roundings as the scalar tail
      const __m256 vinv = _mm256_set1_ps(inv);
      for (; i + 8 <= d; i += 8)
        _mm256_storeu_ps(o + i, _mm256_mul_ps(load8(w + i), _mm256_mul_ps(load8(src + i), vinv)));
#endif
      for (; i < d; ++i) o[i] = to_float(w[i]) * (src[i] * inv);
    }
  });
}

void add_rms_norm_kernels(std::vector<KernelDef>& table) {
  table.push_back(make_kernel<RmsNormArgs>("rms_norm_f32", 4, rms_norm<float>));
  table.push_back(make_kernel<RmsNormArgs>("rms_norm_f16", 4, rms_norm<f16>));
  table.push_back(make_kernel<RmsNormArgs>("rms_norm_bf16", 4, rms_norm<bf16>));
}

}  // namespace metal_engine::cpu
