// kv_write_<kvdt>: copies each token's k and v into its cache slot; slot < 0 is skipped.
#include "../cpu_kernels.h"

namespace metal_engine::cpu {

template <class KV>
static void kv_write(const KVWriteArgs& a, void* const* b, ThreadPool& pool) {
  const float* k = static_cast<const float*>(b[0]);       // [num_tokens, k_stride]
  const float* v = static_cast<const float*>(b[1]);       // [num_tokens, v_stride]
  const int64_t* slots = static_cast<const int64_t*>(b[2]);
  KV* k_cache = static_cast<KV*>(b[3]);                   // [num_blocks, block_size, kv_heads, hd]
  KV* v_cache = static_cast<KV*>(b[4]);
  const int64_t row = int64_t(a.num_kv_heads) * a.head_dim;  // one slot: [kv_heads, hd]
  pool.parallel_for(a.num_tokens, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t slot = slots[t];
      if (slot < 0 || slot >= a.num_slots) continue;
      convert_from_f32(k + t * a.k_stride, k_cache + slot * row, int(row));
      convert_from_f32(v + t * a.v_stride, v_cache + slot * row, int(row));
    }
  });
}

void add_kv_write_kernels(std::vector<KernelDef>& table) {
  table.push_back(make_kernel<KVWriteArgs>("kv_write_f32", 5, kv_write<float>));
  table.push_back(make_kernel<KVWriteArgs>("kv_write_f16", 5, kv_write<f16>));
  table.push_back(make_kernel<KVWriteArgs>("kv_write_bf16", 5, kv_write<bf16>));
}

}  // namespace metal_engine::cpu
