#include "metal_kernels.h"

#include <cstring>
#include <stdexcept>

namespace metal_engine {

namespace {

template <class Args>
Args load(const void* p) {
  Args a;
  std::memcpy(&a, p, sizeof(Args));
  return a;
}

template <class Args>
std::pair<int, DispatchGeometry> plan_one(const void* args) {
  return {0, dispatch_geometry(load<Args>(args))};
}

std::pair<int, DispatchGeometry> plan_matmul(const void* args) {
  const MatmulArgs a = load<MatmulArgs>(args);
  return {a.m <= kMetalGemvMaxRows ? 0 : 1, dispatch_geometry(a)};
}

template <class Args>
MetalKernelSpec one(const std::string& function, int num_buffers) {
  return MetalKernelSpec{sizeof(Args), num_buffers, {function}, &plan_one<Args>};
}

const char* const kWeightTypes[] = {"f32", "f16", "bf16"};

std::vector<std::pair<std::string, MetalKernelSpec>> table() {
  std::vector<std::pair<std::string, MetalKernelSpec>> t;
  auto add = [&](const std::string& name, MetalKernelSpec s) { t.emplace_back(name, std::move(s)); };
  for (const char* w : kWeightTypes) {
    const std::string s = w;
    add("embedding_" + s, one<EmbeddingArgs>("embedding_" + s, 3));
    add("rms_norm_" + s, one<RmsNormArgs>("rms_norm_" + s, 4));
    // matmul: the GEMV kernel for a few rows of x (decode), the simdgroup-matrix GEMM beyond (prefill)
    add("matmul_" + s, MetalKernelSpec{sizeof(MatmulArgs), 4, {"matmul_gemv_" + s, "matmul_gemm_" + s}, &plan_matmul});
    add("matmul_gemv_" + s, one<MatmulArgs>("matmul_gemv_" + s, 4));
    add("matmul_gemm_" + s, one<MatmulArgs>("matmul_gemm_" + s, 4));
    add("kv_write_" + s, one<KVWriteArgs>("kv_write_" + s, 5));
    add("paged_attention_" + s, one<PagedAttentionArgs>("paged_attention_" + s, 7));
    add("paged_attention_split_" + s, one<PagedAttentionSplitArgs>("paged_attention_split_" + s, 9));
    add("paged_attention_decode_" + s, one<PagedAttentionDecodeArgs>("paged_attention_decode_" + s, 10));
    add("paged_attention_prefill_" + s, one<PagedAttentionPrefillArgs>("paged_attention_prefill_" + s, 7));
  }
  add("paged_attention_reduce", one<PagedAttentionReduceArgs>("paged_attention_reduce", 4));
  add("rope", one<RopeArgs>("rope", 4));
  add("silu_mul", one<SiluMulArgs>("silu_mul", 3));
  add("gather_rows", one<GatherRowsArgs>("gather_rows", 3));
  add("argmax", one<ArgmaxArgs>("argmax", 2));
  return t;
}

const std::vector<std::pair<std::string, MetalKernelSpec>>& specs() {
  static const auto t = table();
  return t;
}

}  // namespace

MetalKernelSpec metal_kernel_spec(const std::string& name) {
  for (const auto& kv : specs())
    if (kv.first == name) return kv.second;
  std::string all;
  for (const auto& kv : specs()) all += (all.empty() ? "" : ", ") + kv.first;
  throw std::invalid_argument("the Metal backend has no kernel '" + name + "' (it has: " + all + ")");
}

std::vector<std::string> metal_kernel_names() {
  std::vector<std::string> v;
  for (const auto& kv : specs()) v.push_back(kv.first);
  return v;
}

}  // namespace metal_engine
