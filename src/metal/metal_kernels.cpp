#include "metal_kernels.h"

#include "../core/op_table.h"
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

// paged_attention.metal's kernels: function constant 0 (kWideHeads) for heads past 128 dims (8 values a lane)
int head_dim_of(const PagedAttentionArgs& a) { return a.head_dim; }
int head_dim_of(const PagedAttentionSplitArgs& a) { return a.attn.head_dim; }
int head_dim_of(const PagedAttentionDecodeArgs& a) { return a.attn.head_dim; }
template <class Args>
int head_dim_of(const Args&) { return 0; }  // add_op instantiates every op's; only the attention ops use it

template <class Args>
std::pair<int, DispatchGeometry> plan_attention(const void* args) {
  const Args a = load<Args>(args);
  return {head_dim_of(a) > kMetalNarrowHeadDim ? 1 : 0, dispatch_geometry(a)};
}

template <class Args>
MetalKernelSpec one(const std::string& function, int num_buffers) {
  return MetalKernelSpec{sizeof(Args), num_buffers, {MetalPipelineKey{function, {}}}, &plan_one<Args>};
}

using SpecTable = std::vector<std::pair<std::string, MetalKernelSpec>>;

// Every flavour of one op of the op table, one MSL function each, but
//  - rms_norm_*: one function, two pipelines (function constant 0: add the residual);
//  - paged_attention_*, _decode_*, _split_*: one function, two pipelines (function constant 0: heads wider
//    than 128); paged_attention_reduce_* (the same file) takes the constant too, unused;
//  - matmul_*: the GEMV function for a few rows of x (decode), the simdgroup-matrix GEMM beyond (prefill), each
//    also by its own name; with 16-bit activations a _logits flavour writing f32 (the LM head, the router). The
//    quantized formats' (matmul_<q>: matmul_quant.metal) likewise.
template <class Args>
void add_op(SpecTable& t, const OpInfo& op) {
  const std::string op_name = op.name;
  for (const std::string& name : op_kernel_names(op, /*with_half_activations=*/true, /*with_quantized=*/true)) {
    if (op_name == "rms_norm") {
      t.emplace_back(name, MetalKernelSpec{sizeof(Args), op.num_buffers,
                                           {MetalPipelineKey{name, {{0, false}}}, MetalPipelineKey{name, {{0, true}}}},
                                           &plan_rms_norm});
    } else if (op_name == "matmul") {
      std::vector<std::string> flavours{name};
      if (name.find("_act_") != std::string::npos) flavours.push_back(name + "_logits");
      for (const std::string& f : flavours) {
        const std::string x = f.substr(op_name.size() + 1);
        t.emplace_back(f, MetalKernelSpec{sizeof(Args), op.num_buffers,
                                          {MetalPipelineKey{"matmul_gemv_" + x, {}}, MetalPipelineKey{"matmul_gemm_" + x, {}}},
                                          &plan_matmul});
        t.emplace_back("matmul_gemv_" + x, one<Args>("matmul_gemv_" + x, op.num_buffers));
        t.emplace_back("matmul_gemm_" + x, one<Args>("matmul_gemm_" + x, op.num_buffers));
      }
    } else if (op_name == "paged_attention" || op_name == "paged_attention_decode" ||
               op_name == "paged_attention_split") {
      t.emplace_back(name, MetalKernelSpec{sizeof(Args), op.num_buffers,
                                           {MetalPipelineKey{name, {{0, false}}}, MetalPipelineKey{name, {{0, true}}}},
                                           &plan_attention<Args>});
    } else if (op_name == "paged_attention_reduce") {
      t.emplace_back(name, MetalKernelSpec{sizeof(Args), op.num_buffers, {MetalPipelineKey{name, {{0, false}}}},
                                           &plan_one<Args>});
    } else {
      t.emplace_back(name, one<Args>(name, op.num_buffers));
    }
  }
}

// Generated from the op table (src/core/op_table.h).
SpecTable table() {
  SpecTable t;
#define ME_METAL_SPECS(op, Args, buffers, flavour, metal_only, quantized, writes) add_op<Args>(t, *find_op(#op));
  ME_OPS(ME_METAL_SPECS)
#undef ME_METAL_SPECS
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
  c.prefill_attention_max_head_dim = kMetalNarrowHeadDim;  // its Q, K|V and O tiles in 32 KB of threadgroup memory
  c.max_attention_head_dim = kMetalMaxHeadDim;              // the other attention kernels keep a head in registers
  c.max_query_heads_per_kv_head = 8;
  c.max_attention_group_dims = kMetalMaxGroupDims;          // query heads per KV head x head_dim
  return c;
}

std::string MetalPipelineKey::key() const {
  std::string k = function;
  for (const auto& c : constants) k += "|" + std::to_string(c.first) + "=" + (c.second ? "1" : "0");
  return k;
}

MetalKernelSpec metal_kernel_spec(const std::string& name) {
  for (const auto& kv : specs())
    if (kv.first == name) {
      MetalKernelSpec spec = kv.second;
      spec.writes = op_of_kernel(name)->writes;
      return spec;
    }
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
