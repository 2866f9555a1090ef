#include "metal_kernels.h"

#include "metal_engine/device.h"

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

std::pair<int, DispatchGeometry> plan_rms_norm(const void* args) {
  const RmsNormArgs a = load<RmsNormArgs>(args);
  return {a.add_residual ? 1 : 0, dispatch_geometry(a)};
}

template <class Args>
MetalKernelSpec one(const std::string& function, int num_buffers) {
  return MetalKernelSpec{sizeof(Args), num_buffers, {MetalPipelineKey{function, {}}}, &plan_one<Args>};
}

const char* const kWeightTypes[] = {"f32", "f16", "bf16"};

std::vector<std::pair<std::string, MetalKernelSpec>> table() {
  std::vector<std::pair<std::string, MetalKernelSpec>> t;
  auto add = [&](const std::string& name, MetalKernelSpec s) { t.emplace_back(name, std::move(s)); };
  // Per weight / KV-cache type: <op>_<wdt> with f32 activations, and for the 16-bit types also
  // <op>_<wdt>_act_<wdt> with activations in that type (the matmul's _logits variant writes f32 logits).
  for (const char* w : kWeightTypes) {
    const std::string s = w;
    std::vector<std::string> suffixes{s};
    if (s != "f32") suffixes.push_back(s + "_act_" + s);
    for (const std::string& x : suffixes) {
      add("embedding_" + x, one<EmbeddingArgs>("embedding_" + x, 3));
      // function constant 0: add the residual
      add("rms_norm_" + x, MetalKernelSpec{sizeof(RmsNormArgs), 4,
                                           {MetalPipelineKey{"rms_norm_" + x, {{0, false}}},
                                            MetalPipelineKey{"rms_norm_" + x, {{0, true}}}},
                                           &plan_rms_norm});
      std::vector<std::string> matmuls{x};
      if (x != s) matmuls.push_back(x + "_logits");
      for (const std::string& mx : matmuls) {
        // the GEMV kernel for a few rows of x (decode), the simdgroup-matrix GEMM beyond (prefill)
        add("matmul_" + mx, MetalKernelSpec{sizeof(MatmulArgs), 4,
                                            {MetalPipelineKey{"matmul_gemv_" + mx, {}},
                                             MetalPipelineKey{"matmul_gemm_" + mx, {}}},
                                            &plan_matmul});
        add("matmul_gemv_" + mx, one<MatmulArgs>("matmul_gemv_" + mx, 4));
        add("matmul_gemm_" + mx, one<MatmulArgs>("matmul_gemm_" + mx, 4));
      }
      add("kv_write_" + x, one<KVWriteArgs>("kv_write_" + x, 5));
      add("qk_norm_" + x, one<QKNormArgs>("qk_norm_" + x, 4));
      add("moe_matmul_" + x, one<MoeMatmulArgs>("moe_matmul_" + x, 4));
      add("paged_attention_" + x, one<PagedAttentionArgs>("paged_attention_" + x, 7));
      add("paged_attention_split_" + x, one<PagedAttentionSplitArgs>("paged_attention_split_" + x, 9));
      add("paged_attention_decode_" + x, one<PagedAttentionDecodeArgs>("paged_attention_decode_" + x, 10));
      add("paged_attention_prefill_" + x, one<PagedAttentionPrefillArgs>("paged_attention_prefill_" + x, 7));
    }
  }
  // Activation-only kernels: <op> (f32) and <op>_act_<adt>
  for (const std::string x : {"", "_act_f16", "_act_bf16"}) {
    add("paged_attention_reduce" + x, one<PagedAttentionReduceArgs>("paged_attention_reduce" + x, 4));
    add("rope" + x, one<RopeArgs>("rope" + x, 4));
    add("silu_mul" + x, one<SiluMulArgs>("silu_mul" + x, 3));
    add("gelu_tanh_mul" + x, one<SiluMulArgs>("gelu_tanh_mul" + x, 3));
    add("moe_combine" + x, one<MoeCombineArgs>("moe_combine" + x, 3));
    add("gather_rows" + x, one<GatherRowsArgs>("gather_rows" + x, 3));
  }
  add("argmax", one<ArgmaxArgs>("argmax", 2));
  add("moe_route", one<MoeRouteArgs>("moe_route", 3));
  return t;
}

const std::vector<std::pair<std::string, MetalKernelSpec>>& specs() {
  static const auto t = table();
  return t;
}

}  // namespace

DeviceCaps metal_device_caps() {
  DeviceCaps c;
  c.half_activations = true;
  c.fused_decode_attention = true;
  c.prefill_attention_min_rows = 16;  // a chunk this long fills the prefill kernel's 16-row tiles
  c.prefill_attention_head_dim_multiple = 8;
  c.split_attention_keys = 256;       // keys per partition of the split attention
  c.max_attention_head_dim = 128;     // every attention kernel keeps a head's accumulator in registers
  c.max_query_heads_per_kv_head = 8;
  return c;
}

std::string MetalPipelineKey::key() const {
  std::string k = function;
  for (const auto& c : constants) k += "|" + std::to_string(c.first) + "=" + (c.second ? "1" : "0");
  return k;
}

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
