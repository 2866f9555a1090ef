#include "dispatch_geometry.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace metal_engine {

namespace {
constexpr uint32_t kMaxThreads = 256;
// Threads for a threadgroup that strides over `work` items: whole simdgroups, at most kMaxThreads.
uint32_t threads_for(int work) {
  const uint32_t w = uint32_t(std::max(work, 1));
  return std::min(kMaxThreads, (w + 31) / 32 * 32);
}
DispatchGeometry per_group(int groups, int work) {
  DispatchGeometry g;
  g.groups[0] = uint32_t(std::max(groups, 1));
  g.threads[0] = threads_for(work);
  return g;
}
}  // namespace

DispatchGeometry dispatch_geometry(const RmsNormArgs& a) { return per_group(a.rows, a.dim); }
DispatchGeometry dispatch_geometry(const ArgmaxArgs& a) { return per_group(a.rows, a.vocab); }
DispatchGeometry dispatch_geometry(const FeedTokensArgs& a) {
  return per_group((a.num_tokens + int(kMaxThreads) - 1) / int(kMaxThreads), a.num_tokens);
}
DispatchGeometry dispatch_geometry(const SoftcapArgs& a) { return per_group(a.rows, a.cols); }
DispatchGeometry dispatch_geometry(const EmbeddingArgs& a) { return per_group(a.num_tokens, a.hidden); }
DispatchGeometry dispatch_geometry(const GatherRowsArgs& a) { return per_group(a.rows, a.dim); }
DispatchGeometry dispatch_geometry(const KVWriteArgs& a) { return per_group(a.num_tokens, a.num_kv_heads * a.head_dim); }
DispatchGeometry dispatch_geometry(const RopeArgs& a) {
  return per_group(a.num_tokens, (a.num_heads + a.num_kv_heads) * a.rotary_dim / 2);
}
DispatchGeometry dispatch_geometry(const QKNormArgs& a) {
  DispatchGeometry g;
  g.groups[0] = uint32_t(std::max(a.num_tokens, 1));
  g.groups[1] = uint32_t(std::max(a.num_heads + a.num_kv_heads, 1));
  g.threads[0] = 32;
  return g;
}
DispatchGeometry dispatch_geometry(const MoeRouteArgs& a) {
  if (a.top_k <= 0 || a.top_k > 32 || a.top_k > a.num_experts)
    throw std::invalid_argument("the Metal moe_route kernel takes 1 <= top_k <= min(32, num_experts) (got top_k " +
                                std::to_string(a.top_k) + " of " + std::to_string(a.num_experts) + " experts)");
  DispatchGeometry g;
  g.groups[0] = uint32_t(std::max(a.num_tokens, 1));
  g.threads[0] = 32;
  return g;
}
DispatchGeometry dispatch_geometry(const MoeMatmulArgs& a) {
  DispatchGeometry g;
  g.groups[0] = uint32_t(std::max(1, (a.n + 3) / 4));
  g.groups[1] = uint32_t(std::max(a.num_experts, 1));
  g.threads[0] = 128;
  return g;
}
DispatchGeometry dispatch_geometry(const MoeCombineArgs& a) { return per_group(a.num_tokens, a.dim); }
DispatchGeometry dispatch_geometry(const SiluMulArgs& a) {
  DispatchGeometry g;
  const int64_t n = int64_t(a.rows) * a.dim;
  g.threads[0] = kMaxThreads;
  g.groups[0] = uint32_t(std::max<int64_t>(1, (n + kMaxThreads - 1) / kMaxThreads));
  return g;
}

const char* matmul_kernel_prefix(const MatmulArgs& a) {
  return a.m <= kMetalGemvMaxRows ? "matmul_gemv" : "matmul_gemm";
}

DispatchGeometry dispatch_geometry(const MatmulArgs& a) {
  DispatchGeometry g;
  g.threads[0] = 128;  // 4 simdgroups
  if (a.m <= kMetalGemvMaxRows) {
    g.groups[0] = uint32_t((a.n + 15) / 16);  // 4 simdgroups x 4 rows of W
    g.groups[1] = uint32_t(std::max(a.m, 1));
  } else {
    g.groups[0] = uint32_t((a.n + 31) / 32);  // 32 x 32 output tiles
    g.groups[1] = uint32_t((a.m + 31) / 32);
  }
  return g;
}

static void check_attention_limits(const PagedAttentionArgs& a) {
  const int group = a.num_kv_heads > 0 ? a.num_heads / a.num_kv_heads : 0;
  if (a.head_dim > kMetalMaxHeadDim || a.num_kv_heads <= 0 || a.num_heads % a.num_kv_heads != 0 || group > 8 ||
      group * a.head_dim > kMetalMaxGroupDims)
    throw std::invalid_argument("the Metal paged_attention kernels take head_dim <= " + std::to_string(kMetalMaxHeadDim) +
                                ", up to 8 query heads per KV head and at most " + std::to_string(kMetalMaxGroupDims) +
                                " dims over a KV head's query heads (got head_dim " + std::to_string(a.head_dim) + ", " +
                                std::to_string(a.num_heads) + " heads over " + std::to_string(a.num_kv_heads) + ")");
}

DispatchGeometry dispatch_geometry(const PagedAttentionArgs& a) {
  check_attention_limits(a);
  DispatchGeometry g;
  g.groups[0] = uint32_t(std::max(a.num_tokens, 1));
  g.groups[1] = uint32_t(a.num_kv_heads);
  g.threads[0] = 128;  // 4 simdgroups
  return g;
}

DispatchGeometry dispatch_geometry(const PagedAttentionSplitArgs& a) {
  DispatchGeometry g = dispatch_geometry(a.attn);
  if (a.partition_size <= 0 || a.max_partitions <= 0)
    throw std::invalid_argument("paged_attention_split needs partition_size > 0 and max_partitions > 0");
  g.groups[2] = uint32_t(a.max_partitions);
  return g;
}

DispatchGeometry dispatch_geometry(const PagedAttentionDecodeArgs& a) { return dispatch_geometry(a.attn); }

DispatchGeometry dispatch_geometry(const PagedAttentionReduceArgs& a) {
  DispatchGeometry g = per_group(a.num_tokens, a.head_dim);
  g.groups[1] = uint32_t(std::max(a.num_heads, 1));
  return g;
}

DispatchGeometry dispatch_geometry(const PagedAttentionPrefillArgs& a) {
  check_attention_limits(a.attn);
  if (a.attn.head_dim % 8 != 0 || a.attn.head_dim > kMetalNarrowHeadDim)
    throw std::invalid_argument("the Metal prefill attention kernel takes head_dim a multiple of 8, at most " +
                                std::to_string(kMetalNarrowHeadDim) + " (got " + std::to_string(a.attn.head_dim) + ")");
  DispatchGeometry g;
  g.groups[0] = uint32_t(std::max(1, (a.max_query_len + 15) / 16));
  g.groups[1] = uint32_t(std::max(a.attn.num_seqs, 1));
  g.groups[2] = uint32_t(a.attn.num_heads);
  g.threads[0] = 128;
  return g;
}

}  // namespace metal_engine
