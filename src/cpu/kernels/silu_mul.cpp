// silu_mul: out = silu(gate) * up = gate / (1 + exp(-gate)) * up
#include "../cpu_kernels.h"

namespace metal_engine::cpu {

static void silu_mul(const SiluMulArgs& a, void* const* b, ThreadPool& pool) {
  const float* gate = static_cast<const float*>(b[0]);
  const float* up = static_cast<const float*>(b[1]);
  float* out = static_cast<float*>(b[2]);
  pool.parallel_for(int64_t(a.rows) * a.dim, [&](int64_t i0, int64_t i1) {
    int64_t i = i0;
#if ME_AVX2
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= i1; i += 8) {
      const __m256 g = _mm256_loadu_ps(gate + i);
      const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
      _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
    }
#endif
    for (; i < i1; ++i) {
      const float g = gate[i];
      out[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
  });
}

void add_silu_mul_kernels(std::vector<KernelDef>& table) {
  table.push_back(make_kernel<SiluMulArgs>("silu_mul", 3, silu_mul));
}

}  // namespace metal_engine::cpu
