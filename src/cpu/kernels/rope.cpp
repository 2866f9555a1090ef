// rope: rotary position embedding in place on q and k, HF "rotate_half" layout over the first r = rotary_dim
// dims of each head (the rest unchanged), cos and sin scaled by `scaling` (yarn, longrope):
//   x'[i]       = x[i] * cos(p * f_i) - x[i + r/2] * sin(p * f_i)
//   x'[i + r/2] = x[i + r/2] * cos(p * f_i) + x[i] * sin(p * f_i)
#include <vector>

#include "../cpu_kernels.h"

namespace metal_engine::cpu {

static void rope(const RopeArgs& a, void* const* b, ThreadPool& pool) {
  const int32_t* positions = static_cast<const int32_t*>(b[0]);  // [num_tokens]
  const float* inv_freq = static_cast<const float*>(b[1]);       // [rotary_dim / 2]
  float* q = static_cast<float*>(b[2]);                           // [num_tokens, q_stride]
  float* k = static_cast<float*>(b[3]);                           // [num_tokens, k_stride]
  const int half = a.rotary_dim / 2;
  pool.parallel_for(a.num_tokens, [&](int64_t t0, int64_t t1) {
    std::vector<float> cs(static_cast<size_t>(half)), sn(static_cast<size_t>(half));
    for (int64_t t = t0; t < t1; ++t) {
      const float p = float(positions[t]);
      for (int i = 0; i < half; ++i) {
        const float angle = p * inv_freq[i];
        cs[size_t(i)] = std::cos(angle) * a.scaling;
        sn[size_t(i)] = std::sin(angle) * a.scaling;
      }
      auto rotate = [&](float* x) {
        for (int i = 0; i < half; ++i) {
          const float x0 = x[i], x1 = x[i + half];
          x[i] = x0 * cs[size_t(i)] - x1 * sn[size_t(i)];
          x[i + half] = x1 * cs[size_t(i)] + x0 * sn[size_t(i)];
        }
      };
      for (int h = 0; h < a.num_heads; ++h) rotate(q + t * a.q_stride + h * a.head_dim);
      for (int h = 0; h < a.num_kv_heads; ++h) rotate(k + t * a.k_stride + h * a.head_dim);
    }
  });
}

void add_rope_kernels(std::vector<KernelDef>& table) {
  table.push_back(make_kernel<RopeArgs>("rope", 4, rope));
}

}  // namespace metal_engine::cpu
