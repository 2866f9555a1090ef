// argmax: out[r] = the first index of the largest logit of row r (NaN-free input).
#include "../cpu_kernels.h"

namespace metal_engine::cpu {

static void argmax(const ArgmaxArgs& a, void* const* b, ThreadPool& pool) {
  const float* logits = static_cast<const float*>(b[0]);  // [rows, vocab]
  int32_t* out = static_cast<int32_t*>(b[1]);            // [rows]
  pool.parallel_for(a.rows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = logits + r * a.vocab;
      int best = 0;
      for (int i = 1; i < a.vocab; ++i)
        if (row[i] > row[best]) best = i;
      out[r] = best;
    }
  });
}

void add_argmax_kernels(std::vector<KernelDef>& table) {
  table.push_back(make_kernel<ArgmaxArgs>("argmax", 2, argmax));
}

}  // namespace metal_engine::cpu
