// embedding_<wdt>: out[t, :] = table[token_ids[t], :] * scale
#include "../cpu_kernels.h"

namespace metal_engine::cpu {

template <class W>
static void embedding(const EmbeddingArgs& a, void* const* b, ThreadPool& pool) {
  const int32_t* ids = static_cast<const int32_t*>(b[0]);  // [num_tokens]
  const W* table = static_cast<const W*>(b[1]);            // [vocab, hidden]
  float* out = static_cast<float*>(b[2]);                  // [num_tokens, hidden]
  pool.parallel_for(a.num_tokens, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* o = out + t * a.hidden;
      convert_to_f32(table + int64_t(ids[t]) * a.hidden, o, a.hidden);
      if (a.scale != 1.0f)
        for (int i = 0; i < a.hidden; ++i) o[i] *= a.scale;
    }
  });
}

void add_embedding_kernels(std::vector<KernelDef>& table) {
  table.push_back(make_kernel<EmbeddingArgs>("embedding_f32", 3, embedding<float>));
  table.push_back(make_kernel<EmbeddingArgs>("embedding_f16", 3, embedding<f16>));
  table.push_back(make_kernel<EmbeddingArgs>("embedding_bf16", 3, embedding<bf16>));
}

}  // namespace metal_engine::cpu
