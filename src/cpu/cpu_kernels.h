// The cpu backend's kernel table. Each src/cpu/kernels/<op>.cpp defines its op for every dtype and
// registers it by the same name the Metal kernels use (e.g. "matmul_f16").
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "../../metal/op_args.h"
#include "simd.h"
#include "thread_pool.h"

namespace metal_engine::cpu {

struct KernelDef {
  std::string name;
  size_t args_size = 0;  // sizeof the op's argument struct
  int num_buffers = 0;   // bindings after the argument struct
  std::function<void(const void* args, void* const* buffers, ThreadPool& pool)> run;
};

template <class Args>
KernelDef make_kernel(std::string name, int num_buffers, void (*fn)(const Args&, void* const*, ThreadPool&)) {
  return KernelDef{std::move(name), sizeof(Args), num_buffers,
                   [fn](const void* a, void* const* b, ThreadPool& p) { fn(*static_cast<const Args*>(a), b, p); }};
}

// y [M, N] = x [M, K] @ W [N, K]^T on the pool's threads: the matmul kernel's GEMV / GEMM paths, for kernels
// made of matmuls (the experts of moe_matmul).
template <class W>
void matmul_rows(const float* x, int M, int K, const W* w, float* y, int N, ThreadPool& pool);

void add_embedding_kernels(std::vector<KernelDef>& table);
void add_rms_norm_kernels(std::vector<KernelDef>& table);
void add_matmul_kernels(std::vector<KernelDef>& table);
void add_quant_matmul_kernels(std::vector<KernelDef>& table);  // matmul_<q>, embedding_<q>
void add_rope_kernels(std::vector<KernelDef>& table);
void add_silu_mul_kernels(std::vector<KernelDef>& table);
void add_qk_norm_kernels(std::vector<KernelDef>& table);
void add_moe_kernels(std::vector<KernelDef>& table);
void add_kv_write_kernels(std::vector<KernelDef>& table);
void add_paged_attention_kernels(std::vector<KernelDef>& table);
void add_gather_rows_kernels(std::vector<KernelDef>& table);
void add_argmax_kernels(std::vector<KernelDef>& table);
void add_feed_tokens_kernels(std::vector<KernelDef>& table);
void add_softcap_kernels(std::vector<KernelDef>& table);

}  // namespace metal_engine::cpu
