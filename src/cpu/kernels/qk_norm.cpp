// qk_norm_<wdt>: per-head RMSNorm of q and k in place (Qwen3, Gemma 3), one head's head_dim values at a time:
//   x[h] = x[h] / sqrt(mean(x[h]^2) + eps) * w      (w: q_weight for q's heads, k_weight for k's)
#include "../cpu_kernels.h"

namespace metal_engine::cpu {

template <class W>
static void qk_norm(const QKNormArgs& a, void* const* b, ThreadPool& pool) {
  float* q = static_cast<float*>(b[0]);           // [num_tokens, q_stride]
  float* k = static_cast<float*>(b[1]);           // [num_tokens, k_stride]
  const W* qw = static_cast<const W*>(b[2]);      // [head_dim]
  const W* kw = static_cast<const W*>(b[3]);      // [head_dim]
  const int d = a.head_dim, heads = a.num_heads + a.num_kv_heads;
  pool.parallel_for(int64_t(a.num_tokens) * heads, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r / heads;
      const int h = int(r % heads);
      const bool is_q = h < a.num_heads;
      float* x = is_q ? q + t * a.q_stride + int64_t(h) * d : k + t * a.k_stride + int64_t(h - a.num_heads) * d;
      const W* w = is_q ? qw : kw;
      const float inv = 1.0f / std::sqrt(dot(x, x, d) / float(d) + a.eps);
      for (int i = 0; i < d; ++i) x[i] = to_float(w[i]) * (x[i] * inv);
    }
  });
}

void add_qk_norm_kernels(std::vector<KernelDef>& table) {
  table.push_back(make_kernel<QKNormArgs>("qk_norm_f32", 4, qk_norm<float>));
  table.push_back(make_kernel<QKNormArgs>("qk_norm_f16", 4, qk_norm<f16>));
  table.push_back(make_kernel<QKNormArgs>("qk_norm_bf16", 4, qk_norm<bf16>));
}

}  // namespace metal_engine::cpu
