// Argument structs of every kernel, shared by the host (C++) and the kernels (MSL on Metal, C++ on the
// cpu backend). Bound at buffer(0) on Metal; the buffers listed under each struct follow at 1, 2, ...
// Only 4-byte int/float fields: identical layout on both sides, checked by static_assert below.
#pragma once

#ifdef __METAL_VERSION__
#define ME_STATIC_ASSERT(c, m) static_assert(c, m)
#else
#define ME_STATIC_ASSERT(c, m) static_assert(c, m)
#endif

namespace metal_engine {

// embedding_<wdt>: out[t, :] = table[token_ids[t], :] * scale       (Gemma: scale = sqrt(hidden); else 1)
// buffers: token_ids i32 [num_tokens], table wdt [vocab, hidden], out f32 [num_tokens, hidden]
struct EmbeddingArgs {
  int num_tokens;
  int hidden;
  int vocab;
  float scale;
};

// rms_norm_<wdt>: if add_residual: residual[r] += x[r];  out[r] = residual[r] / rms(residual[r]) * w
//                 else:                                   out[r] = x[r] / rms(x[r]) * w
// buffers: x f32 [rows, dim], residual f32 [rows, dim] (in/out; unbound if !add_residual),
//          weight wdt [dim], out f32 [rows, dim] (may alias x)
struct RmsNormArgs {
  int rows;
  int dim;
  float eps;
  int add_residual;
};

// matmul_<wdt>: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n])      (x @ W^T, W in PyTorch layout)
// buffers: x f32 [m, k], w wdt [n, k], bias wdt [n] (unbound if !has_bias), y f32 [m, y_stride] (columns 0..n-1
// of rows y_stride apart: one part of a fused output whose parts are in different formats)
// matmul_<q> (quantized W, rows of blocks): has_bias is 0 or 1 + the bias's DType (f32, f16, bf16)
struct MatmulArgs {
  int m;
  int n;
  int k;
  int has_bias;
  int y_stride;  // >= n
};

// rope: rotates q and k in place, HF "rotate_half" layout over the first rotary_dim dims of each head (pairs i
// and i + rotary_dim/2; the rest pass through):
//   angle = positions[t] * inv_freq[i];  x' = (x0 cos - x1 sin, x1 cos + x0 sin) with cos, sin scaled by `scaling`
// buffers: positions i32 [num_tokens], inv_freq f32 [rotary_dim/2],
//          q f32 [num_tokens, q_stride], k f32 [num_tokens, k_stride]
struct RopeArgs {
  int num_tokens;
  int num_heads;
  int num_kv_heads;
  int head_dim;
  int rotary_dim;  // <= head_dim, even (partial_rotary_factor)
  int q_stride;
  int k_stride;
  float scaling;   // the cos/sin factor of yarn and longrope (1 otherwise)
};

// qk_norm_<wdt>: RMSNorm of every head of q and k in place (Qwen3, Gemma 3: before RoPE), each head's
// head_dim values by their own rms, times q_weight (q heads) or k_weight (k heads):
//   x[h] = x[h] / sqrt(mean(x[h]^2) + eps) * w
// buffers: q f32 [num_tokens, q_stride] (heads at h * head_dim), k f32 [num_tokens, k_stride],
//          q_weight wdt [head_dim], k_weight wdt [head_dim]
struct QKNormArgs {
  int num_tokens;
  int num_heads;
  int num_kv_heads;
  int head_dim;
  int q_stride;
  int k_stride;
  float eps;
};

// silu_mul:      out[r, i] = silu(gate[r, i]) * up[r, i] for i < dim                          (SwiGLU)
// gelu_tanh_mul: out[r, i] = gelu_tanh(gate[r, i]) * up[r, i], gelu_tanh(x) = x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
//                                                                                             (GeGLU: Gemma)
// buffers: gate f32 [rows, in_stride], up f32 [rows, in_stride], out f32 [rows, dim]. gate and up may be the
// two halves of one fused gate_up projection (in_stride = 2 * dim, up bound at an offset of dim elements).
struct SiluMulArgs {
  int rows;
  int dim;
  int in_stride;
};

// kv_write_<kvdt>: for t with slot_mapping[t] >= 0:
//   k_cache[slot / block_size, slot % block_size, h, :] = k[t, h*head_dim : (h+1)*head_dim]  (same for v)
// buffers: k f32 [num_tokens, k_stride], v f32 [num_tokens, v_stride], slot_mapping i64 [num_tokens],
//          k_cache kvdt [num_blocks, block_size, num_kv_heads, head_dim], v_cache (same)
struct KVWriteArgs {
  int num_tokens;
  int num_kv_heads;
  int head_dim;
  int block_size;
  int num_slots;
  int k_stride;
  int v_stride;
};

// paged_attention_<kvdt>: causal attention of each query token over its sequence's cached keys.
// Query token i of sequence s sits at context position p = seq_lens[s] - q_len(s) + i and attends to
// keys j <= p (and p - j < sliding_window when sliding_window > 0). GQA: head h reads kv head
// h / (num_heads / num_kv_heads). Scores are q . k * scale, then softcap * tanh(score / softcap) when
// softcap > 0 (Gemma 2).
// buffers: q f32 [num_tokens, q_stride], k_cache, v_cache kvdt [num_blocks, block_size, kv_heads, hd],
//          block_tables i32 [num_seqs, block_table_width], query_start_loc i32 [num_seqs + 1],
//          seq_lens i32 [num_seqs], out f32 [num_tokens, num_heads * head_dim]
// (num_tokens = query_start_loc[num_seqs], given so a GPU grid can be sized from the arguments alone.)
struct PagedAttentionArgs {
  int num_seqs;
  int num_heads;
  int num_kv_heads;
  int head_dim;
  int block_size;
  int block_table_width;
  int q_stride;
  int sliding_window;
  float scale;
  int num_tokens;
  float softcap;  // 0: none
};

// paged_attention_split_<kvdt> + paged_attention_reduce: the same attention as paged_attention, with each
// row's keys cut into partitions of partition_size (vLLM's v2 kernel), for long contexts: every
// (row, KV head, partition) is a threadgroup writing its partial result; the reduce kernel merges them.
// split buffers: q, k_cache, v_cache, block_tables, query_start_loc, seq_lens (as paged_attention), then
//   part_max f32 [num_tokens, num_heads, max_partitions], part_sum (same), part_out f32 [.., head_dim]
// reduce buffers: part_max, part_sum, part_out, out f32 [num_tokens, num_heads * head_dim]
struct PagedAttentionSplitArgs {
  PagedAttentionArgs attn;
  int partition_size;  // keys per partition
  int max_partitions;  // partitions per row in the part_* buffers (>= ceil(longest context / partition_size))
};

// paged_attention_prefill_<kvdt>: the same attention, tiled for long prefill chunks: one threadgroup per
// (16 query rows of one sequence, query head); S = Q K^T and O += P V as simdgroup_float8x8 tiles over
// 16-key blocks, an online softmax per row between them. Buffers as paged_attention.
struct PagedAttentionPrefillArgs {
  PagedAttentionArgs attn;
  int max_query_len;  // longest query chunk of the step: sizes the grid
};

// paged_attention_decode_<kvdt>: kv_write and paged_attention in one kernel, for a step where every
// sequence has exactly one new token (each threadgroup writes only its own row's k and v, so no row may need
// another row's new key). Slots outside [0, num_slots) are not written.
// buffers: q, k f32 [num_tokens, k_stride], v f32 [num_tokens, v_stride], slot_mapping i64 [num_tokens],
//          k_cache, v_cache, block_tables, query_start_loc, seq_lens, out (as paged_attention)
struct PagedAttentionDecodeArgs {
  PagedAttentionArgs attn;
  int k_stride;
  int v_stride;
  int num_slots;
};

struct PagedAttentionReduceArgs {
  int num_tokens;
  int num_heads;
  int head_dim;
  int max_partitions;
};

// A mixture-of-experts MLP (Mixtral, Qwen3-MoE) is three ops around the experts' gated activation:
// moe_route: each token's top_k experts by router probability, per token t:
//   p = softmax(logits[t]) (f32); ids[t, :] = the top_k experts by p, largest first (ties: the lower id);
//   weights[t, :] = their p, divided by their sum when renormalize
// buffers: logits f32 [num_tokens, num_experts], ids i32 [num_tokens, top_k], weights f32 [num_tokens, top_k]
struct MoeRouteArgs {
  int num_tokens;
  int num_experts;
  int top_k;
  int renormalize;
};

// moe_matmul_<wdt>: the selected experts' projection, grouped by expert. For each row r < rows:
//   y[r, :] = x[r / x_row_div, :] @ W[ids[r]]^T              (W [num_experts, n, k], PyTorch layout per expert)
// with rows = num_tokens * top_k (one per token and slot) and ids moe_route's [num_tokens, top_k] read flat; the
// gate/up projection reads each token's row once per slot (x_row_div = top_k), the down projection its own row
// (x_row_div = 1). Each expert some row selects reads its weights once (cpu: a GEMV or GEMM over its rows); an
// expert no row selects is not read. Rows whose id is outside [0, num_experts) are written as zeros.
// buffers: x f32 [rows / x_row_div, k], w wdt [num_experts, n, k], ids i32 [rows], y f32 [rows, n]
struct MoeMatmulArgs {
  int rows;
  int n;
  int k;
  int num_experts;
  int x_row_div;
};

// moe_combine: out[t, :] = sum_j weights[t, j] * y[t * top_k + j, :]
// buffers: y f32 [num_tokens * top_k, dim], weights f32 [num_tokens, top_k], out f32 [num_tokens, dim]
struct MoeCombineArgs {
  int num_tokens;
  int top_k;
  int dim;
};

// gather_rows: dst[r, :] = src[indices[r], :]
// buffers: src f32 [*, dim], indices i32 [rows], dst f32 [rows, dim]
struct GatherRowsArgs {
  int rows;
  int dim;
};

// softcap: out[r, i] = cap * tanh(x[r, i] / cap)       (Gemma 2's final logits; out may alias x)
// buffers: x f32 [rows, cols], out f32 [rows, cols]
struct SoftcapArgs {
  int rows;
  int cols;
  float cap;
};

// argmax: out[r] = the first index of the largest value of row r (greedy decoding without reading logits back)
// buffers: logits f32 [rows, vocab], out i32 [rows]
struct ArgmaxArgs {
  int rows;
  int vocab;
};

// feed_tokens: dst[t] = src[rows[t]] where 0 <= rows[t] < num_src, else dst[t] unchanged. A step's token ids from
// the greedy tokens of the step before it, on the device (two steps in flight: the host never saw those tokens);
// also how a greedy step hands its tokens to the next (rows = 0..n-1 into a buffer of their own).
// buffers: src i32 [num_src], rows i32 [num_tokens], dst i32 [num_tokens] (read-write)
struct FeedTokensArgs {
  int num_tokens;
  int num_src;
};

ME_STATIC_ASSERT(sizeof(EmbeddingArgs) == 16, "EmbeddingArgs layout");
ME_STATIC_ASSERT(sizeof(FeedTokensArgs) == 8, "FeedTokensArgs layout");
ME_STATIC_ASSERT(sizeof(ArgmaxArgs) == 8, "ArgmaxArgs layout");
ME_STATIC_ASSERT(sizeof(SoftcapArgs) == 12, "SoftcapArgs layout");
ME_STATIC_ASSERT(sizeof(RmsNormArgs) == 16, "RmsNormArgs layout");
ME_STATIC_ASSERT(sizeof(MatmulArgs) == 20, "MatmulArgs layout");
ME_STATIC_ASSERT(sizeof(RopeArgs) == 32, "RopeArgs layout");
ME_STATIC_ASSERT(sizeof(SiluMulArgs) == 12, "SiluMulArgs layout");
ME_STATIC_ASSERT(sizeof(QKNormArgs) == 28, "QKNormArgs layout");
ME_STATIC_ASSERT(sizeof(MoeRouteArgs) == 16, "MoeRouteArgs layout");
ME_STATIC_ASSERT(sizeof(MoeMatmulArgs) == 20, "MoeMatmulArgs layout");
ME_STATIC_ASSERT(sizeof(MoeCombineArgs) == 12, "MoeCombineArgs layout");
ME_STATIC_ASSERT(sizeof(KVWriteArgs) == 28, "KVWriteArgs layout");
ME_STATIC_ASSERT(sizeof(PagedAttentionArgs) == 44, "PagedAttentionArgs layout");
ME_STATIC_ASSERT(sizeof(GatherRowsArgs) == 8, "GatherRowsArgs layout");
ME_STATIC_ASSERT(sizeof(PagedAttentionSplitArgs) == 52, "PagedAttentionSplitArgs layout");
ME_STATIC_ASSERT(sizeof(PagedAttentionReduceArgs) == 16, "PagedAttentionReduceArgs layout");
ME_STATIC_ASSERT(sizeof(PagedAttentionPrefillArgs) == 48, "PagedAttentionPrefillArgs layout");
ME_STATIC_ASSERT(sizeof(PagedAttentionDecodeArgs) == 56, "PagedAttentionDecodeArgs layout");

}  // namespace metal_engine
