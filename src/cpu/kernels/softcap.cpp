// softcap: out = cap * tanh(x / cap) (Gemma 2's final logits)
#include <cmath>

#include "../cpu_kernels.h"

namespace metal_engine::cpu {

static void softcap(const SoftcapArgs& a, void* const* b, ThreadPool& pool) {
  const float* x = static_cast<const float*>(b[0]);  // [rows, cols]
  float* out = static_cast<float*>(b[1]);            // [rows, cols], may alias x
  const float cap = a.cap, inv = 1.0f / a.cap;
  pool.parallel_for(int64_t(a.rows) * a.cols, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) out[i] = cap * std::tanh(x[i] * inv);
  });
}

void add_softcap_kernels(std::vector<KernelDef>& table) {
  table.push_back(make_kernel<SoftcapArgs>("softcap", 2, softcap));
}

}  // namespace metal_engine::cpu
