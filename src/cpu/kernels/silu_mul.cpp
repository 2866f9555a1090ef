// The gated activations of the MLP, out = act(gate) * up:
//   silu_mul      (SwiGLU): silu(g) = g / (1 + exp(-g))
//   gelu_tanh_mul (GeGLU, Gemma): gelu_tanh(g) = g/2 (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))
#include <algorithm>

#include "../cpu_kernels.h"

namespace metal_engine::cpu {

namespace {

constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)

struct Silu {
  static float apply(float g) { return g / (1.0f + std::exp(-g)); }
#if ME_AVX2
  static __m256 apply8(__m256 g) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    return _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
  }
#endif
};

struct GeluTanh {
  static float apply(float g) { return 0.5f * g * (1.0f + std::tanh(kGeluC * (g + 0.044715f * g * g * g))); }
#if ME_AVX2
  // 0.5 g (1 + tanh(u)) = g - g / (1 + exp(2u))
  static __m256 apply8(__m256 g) {
    const __m256 u = _mm256_mul_ps(_mm256_set1_ps(kGeluC),
                                   _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), _mm256_mul_ps(g, g)), g, g));
    const __m256 e = exp8(_mm256_add_ps(u, u));
    return _mm256_sub_ps(g, _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)));
  }
#endif
};

template <class Act>
void gated(const SiluMulArgs& a, void* const* b, ThreadPool& pool) {
  const float* gate = static_cast<const float*>(b[0]);  // [rows, in_stride]
  const float* up = static_cast<const float*>(b[1]);    // [rows, in_stride]
  float* out = static_cast<float*>(b[2]);               // [rows, dim]
  const int64_t dim = a.dim, stride = a.in_stride;
  pool.parallel_for(int64_t(a.rows) * dim, [&](int64_t i0, int64_t i1) {
    for (int64_t r = i0 / dim; r * dim < i1; ++r) {  // the pieces of rows in [i0, i1)
      const int64_t c0 = std::max(i0 - r * dim, int64_t(0)), c1 = std::min(i1 - r * dim, dim);
      const float* g = gate + r * stride;
      const float* u = up + r * stride;
      float* o = out + r * dim;
      int64_t c = c0;
#if ME_AVX2
      for (; c + 8 <= c1; c += 8)
        _mm256_storeu_ps(o + c, _mm256_mul_ps(Act::apply8(_mm256_loadu_ps(g + c)), _mm256_loadu_ps(u + c)));
#endif
      for (; c < c1; ++c) o[c] = Act::apply(g[c]) * u[c];
    }
  });
}

}  // namespace

void add_silu_mul_kernels(std::vector<KernelDef>& table) {
  table.push_back(make_kernel<SiluMulArgs>("silu_mul", 3, gated<Silu>));
  table.push_back(make_kernel<SiluMulArgs>("gelu_tanh_mul", 3, gated<GeluTanh>));
}

}  // namespace metal_engine::cpu
