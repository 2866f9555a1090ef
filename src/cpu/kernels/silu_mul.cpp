// silu_mul: out = silu(gate) * up = gate / (1 + exp(-gate)) * up
#include <algorithm>

#include "../cpu_kernels.h"

namespace metal_engine::cpu {

static void silu_mul(const SiluMulArgs& a, void* const* b, ThreadPool& pool) {
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
      const __m256 one = _mm256_set1_ps(1.0f);
      for (; c + 8 <= c1; c += 8) {
        const __m256 gv = _mm256_loadu_ps(g + c);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        _mm256_storeu_ps(o + c, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + c)));
      }
#endif
      for (; c < c1; ++c) o[c] = g[c] / (1.0f + std::exp(-g[c])) * u[c];
    }
  });
}

void add_silu_mul_kernels(std::vector<KernelDef>& table) {
  table.push_back(make_kernel<SiluMulArgs>("silu_mul", 3, silu_mul));
}

}  // namespace metal_engine::cpu
