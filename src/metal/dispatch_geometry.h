// How many threadgroups of how many threads each kernel is dispatched with: one place, shared by the Metal
// backend and by metal-sim, so both run the kernels exactly alike.
#pragma once
#include <cstdint>

#include "../../metal/op_args.h"

namespace metal_engine {

struct DispatchGeometry {
  uint32_t groups[3] = {1, 1, 1};   // threadgroups per grid
  uint32_t threads[3] = {1, 1, 1};  // threads per threadgroup
};

DispatchGeometry dispatch_geometry(const RmsNormArgs& a);      // one threadgroup per row
DispatchGeometry dispatch_geometry(const SiluMulArgs& a);      // one thread per element
DispatchGeometry dispatch_geometry(const EmbeddingArgs& a);    // one threadgroup per token
DispatchGeometry dispatch_geometry(const GatherRowsArgs& a);   // one threadgroup per row
DispatchGeometry dispatch_geometry(const KVWriteArgs& a);      // one threadgroup per token
DispatchGeometry dispatch_geometry(const RopeArgs& a);         // one threadgroup per token
DispatchGeometry dispatch_geometry(const ArgmaxArgs& a);       // one threadgroup per row
DispatchGeometry dispatch_geometry(const FeedTokensArgs& a);  // a thread per token, 256 a threadgroup
DispatchGeometry dispatch_geometry(const SoftcapArgs& a);      // one threadgroup per row
DispatchGeometry dispatch_geometry(const QKNormArgs& a);       // one simdgroup per (token, head)
DispatchGeometry dispatch_geometry(const MoeRouteArgs& a);     // one simdgroup per token; top_k <= 32
DispatchGeometry dispatch_geometry(const MoeMatmulArgs& a);    // (4 rows of W, expert), a simdgroup per row
DispatchGeometry dispatch_geometry(const MoeCombineArgs& a);   // one threadgroup per token
// matmul: the GEMV kernel for up to kMetalGemvMaxRows rows of x, the simdgroup-matrix GEMM beyond.
constexpr int kMetalGemvMaxRows = 4;
const char* matmul_kernel_prefix(const MatmulArgs& a);         // "matmul_gemv" or "matmul_gemm"
DispatchGeometry dispatch_geometry(const MatmulArgs& a);
// paged attention: one threadgroup per (query token, KV head); throws std::invalid_argument past the
// kernels' limits (head_dim <= kMetalMaxHeadDim, num_heads / num_kv_heads <= 8, their product <=
// kMetalMaxGroupDims). Heads wider than kMetalNarrowHeadDim take the kernels' wide-head pipelines.
constexpr int kMetalNarrowHeadDim = 128;
constexpr int kMetalMaxHeadDim = 256;
constexpr int kMetalMaxGroupDims = 1024;
DispatchGeometry dispatch_geometry(const PagedAttentionArgs& a);
DispatchGeometry dispatch_geometry(const PagedAttentionSplitArgs& a);   // (row, KV head, partition)
DispatchGeometry dispatch_geometry(const PagedAttentionDecodeArgs& a);  // (row, KV head), as paged_attention
DispatchGeometry dispatch_geometry(const PagedAttentionReduceArgs& a);  // (row, query head)
// (16 query rows, sequence, query head); head_dim a multiple of 8, at most kMetalNarrowHeadDim
DispatchGeometry dispatch_geometry(const PagedAttentionPrefillArgs& a);

}  // namespace metal_engine
