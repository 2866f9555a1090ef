#include "ops.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "../../metal/op_args.h"

namespace metal_engine::models {

Tensor Tensor::columns(int first, int n) const {
  if (first < 0 || n < 0 || first + n > cols)
    throw std::logic_error("Tensor::columns(" + std::to_string(first) + ", " + std::to_string(n) + ") of " +
                           std::to_string(cols) + " columns");
  Tensor t = *this;
  t.arg.offset += size_t(first) * dtype_size(dtype);
  t.cols = n;
  return t;
}

const Kernel& KernelCache::get(const std::string& name) {
  auto it = kernels_.find(name);
  if (it == kernels_.end()) it = kernels_.emplace(name, device_.kernel(name)).first;
  return it->second;
}

Ops::Ops(Device& device, KernelCache& kernels, ScratchPool& pool, PagedKVCache& kv, DType act, const StepInput& in,
         const StepTensors& step, bool measuring, int num_heads, int head_dim)
    : d_(device), kernels_(kernels), pool_(pool), kv_(kv), act_(act), caps_(device.caps()), in_(in), step_(step),
      measuring_(measuring) {
  T_ = in.num_tokens();
  S_ = in.num_seqs();
  R_ = int(in.logits_indices.size());
  for (int s = 0; s < S_; ++s) {
    max_query_len_ = std::max(max_query_len_, in.query_start_loc[size_t(s) + 1] - in.query_start_loc[size_t(s)]);
    max_seq_len_ = std::max(max_seq_len_, in.seq_lens[size_t(s)]);
  }
  for (int32_t p : in.positions) max_position_ = std::max(max_position_, int(p));
  // The attention path of the step: the tiled prefill kernel when a chunk has many rows; split into
  // partitions of keys (and reduced) when a context is long; fused with the KV write when every sequence
  // has one new token; else the one-threadgroup-per-row kernel (always, on cpu).
  if (caps_.prefill_attention_min_rows > 0 && max_query_len_ >= caps_.prefill_attention_min_rows)
    path_ = AttentionPath::Prefill;
  else if (caps_.split_attention_keys > 0 && max_seq_len_ > caps_.split_attention_keys)
    path_ = AttentionPath::Split;
  else if (caps_.fused_decode_attention && max_query_len_ == 1)
    path_ = AttentionPath::FusedDecode;
  if (path_ == AttentionPath::Split) {
    partitions_ = (max_seq_len_ + caps_.split_attention_keys - 1) / caps_.split_attention_keys;
    const int rows = T_ * num_heads * partitions_;
    part_max_ = alloc_f32(rows, 1, "attention partition max");          // f32 [T, heads, P]
    part_sum_ = alloc_f32(rows, 1, "attention partition sum");          // f32 [T, heads, P]
    part_out_ = alloc_f32(rows, head_dim, "attention partition out");   // f32 [T, heads, P, hd]
  }
}

std::string Ops::act_suffix() const { return act_ == DType::F32 ? "" : std::string("_act_") + dtype_name(act_); }

std::string Ops::kernel_name(const std::string& op, DType weight) const {
  return op + "_" + dtype_name(weight) + act_suffix();
}

void Ops::check_rows(const Tensor& t, const char* what) const {
  if (!t.contiguous()) throw std::logic_error(std::string(what) + ": this op takes contiguous rows");
}

Tensor Ops::alloc(int rows, int cols, const char* label) {
  Tensor t;
  t.dtype = act_;
  t.rows = rows;
  t.cols = t.stride = cols;
  t.arg = pool_.alloc(dtype_size(act_) * size_t(std::max(rows, 1)) * size_t(cols), label);
  return t;
}

Tensor Ops::alloc_f32(int rows, int cols, const char* label) {
  Tensor t;
  t.rows = rows;
  t.cols = t.stride = cols;
  t.arg = pool_.alloc(sizeof(float) * size_t(std::max(rows, 1)) * size_t(cols), label);
  return t;
}

Tensor Ops::alloc_i32(int rows, int cols, const char* label) {
  Tensor t;
  t.dtype = DType::I32;
  t.rows = rows;
  t.cols = t.stride = cols;
  t.arg = pool_.alloc(sizeof(int32_t) * size_t(std::max(rows, 1)) * size_t(cols), label);
  return t;
}

Tensor Ops::rope_table(const RotaryEmbedding& rope) {
  if (!rope.params.per_step()) {
    Tensor t;
    t.arg = rope.inv_freq.arg;
    t.rows = 1;
    t.cols = t.stride = int(rope.inv_freq.rows());
    return t;
  }
  const std::vector<float> values = rope.params.inv_freq(max_position_);
  Tensor t = alloc_f32(1, int(values.size()), "rope inv_freq (this step)");
  if (!measuring_) std::memcpy(pool_.host_ptr(t.arg), values.data(), sizeof(float) * values.size());
  return t;
}

void Ops::embedding(const Weight& table, const Tensor& out, float scale) {
  check_rows(out, "embedding");
  run(kernel_name("embedding", table.dtype), EmbeddingArgs{T_, out.cols, int(table.rows()), scale},
              {step_.token_ids, table.arg, out.arg});
}

void Ops::linear(const Tensor& x, const Weight& w, const Weight& bias, const Tensor& y) {
  check_rows(x, "linear input");
  check_rows(y, "linear output");
  if (x.cols != w.cols() || y.cols != w.rows() || x.rows != y.rows)
    throw std::logic_error("linear: x [" + std::to_string(x.rows) + ", " + std::to_string(x.cols) + "] W [" +
                           std::to_string(w.rows()) + ", " + std::to_string(w.cols()) + "] y [" +
                           std::to_string(y.rows) + ", " + std::to_string(y.cols) + "]");
  run(kernel_name("matmul", w.dtype),
              MatmulArgs{x.rows, int(w.rows()), int(w.cols()), bias.present() ? 1 : 0}, {x.arg, w.arg, bias.arg, y.arg});
}

Tensor Ops::linear(const Tensor& x, const Weight& w, const Weight& bias, const char* label) {
  Tensor y = alloc(x.rows, int(w.rows()), label);
  linear(x, w, bias, y);
  return y;
}

Tensor Ops::logits(const Tensor& x, const Weight& w) { return linear_f32(x, w, "logits"); }

Tensor Ops::linear_f32(const Tensor& x, const Weight& w, const char* label) {
  Tensor y = alloc_f32(x.rows, int(w.rows()), label);
  check_rows(x, label);
  if (x.rows == 0) return y;
  // 16-bit activations: the _logits flavour of the matmul writes f32
  const std::string name = kernel_name("matmul", w.dtype) + (act_ == DType::F32 ? "" : "_logits");
  run(name, MatmulArgs{x.rows, int(w.rows()), int(w.cols()), 0}, {x.arg, w.arg, BufferArg{}, y.arg});
  return y;
}

void Ops::rms_norm(const Tensor& x, const Weight& w, float eps, const Tensor& out) {
  check_rows(x, "rms_norm");
  check_rows(out, "rms_norm output");
  run(kernel_name("rms_norm", w.dtype), RmsNormArgs{x.rows, x.cols, eps, 0},
              {x.arg, BufferArg{}, w.arg, out.arg});
}

void Ops::add_rms_norm(const Tensor& x, const Tensor& residual, const Weight& w, float eps, const Tensor& out) {
  check_rows(x, "add_rms_norm");
  check_rows(residual, "add_rms_norm residual");
  check_rows(out, "add_rms_norm output");
  run(kernel_name("rms_norm", w.dtype), RmsNormArgs{x.rows, x.cols, eps, 1},
              {x.arg, residual.arg, w.arg, out.arg});
}

void Ops::rope(const RotaryEmbedding& rope, const Tensor& table, const Tensor& q, const Tensor& k, int num_heads,
               int num_kv_heads) {
  const RopeParams& p = rope.params;
  if (table.cols != p.rotary_dim / 2) throw std::logic_error("rope: the table is not this rope's");
  run("rope" + act_suffix(),
              RopeArgs{T_, num_heads, num_kv_heads, p.head_dim, p.rotary_dim, q.stride, k.stride,
                       float(p.attention_factor)},
              {step_.positions, table.arg, q.arg, k.arg});
}

void Ops::qk_norm(const Tensor& q, const Tensor& k, const Weight& q_weight, const Weight& k_weight, int num_heads,
                  int num_kv_heads, float eps) {
  const int hd = int(q_weight.rows());
  if (q.cols != num_heads * hd || k.cols != num_kv_heads * hd || k_weight.rows() != hd)
    throw std::logic_error("qk_norm: q, k and the weights disagree on head_dim");
  run(kernel_name("qk_norm", q_weight.dtype), QKNormArgs{T_, num_heads, num_kv_heads, hd, q.stride, k.stride, eps},
      {q.arg, k.arg, q_weight.arg, k_weight.arg});
}

void Ops::attention(int layer, const Tensor& q, const Tensor& k, const Tensor& v, const AttentionParams& p,
                    const Tensor& out) {
  check_rows(out, "attention output");
  if (k.stride != v.stride) throw std::logic_error("attention: k and v need one row stride");
  const std::string w = dtype_name(kv_.shape().dtype);
  const std::string ax = act_suffix();
  const int bs = kv_.block_size(), W = in_.block_table_width, slots = int(kv_.num_slots());
  PagedAttentionArgs pa{S_, p.num_heads, p.num_kv_heads, p.head_dim, bs, W, q.stride, p.sliding_window, p.scale, T_,
                        p.softcap};
  BufferArg kc = kv_.key_cache(layer), vc = kv_.value_cache(layer);
  if (path_ == AttentionPath::FusedDecode) {
    run("paged_attention_decode_" + w + ax, PagedAttentionDecodeArgs{pa, k.stride, v.stride, slots},
                {q.arg, k.arg, v.arg, step_.slot_mapping, kc, vc, step_.block_tables, step_.query_start_loc,
                 step_.seq_lens, out.arg});
    return;
  }
  run("kv_write_" + w + ax, KVWriteArgs{T_, p.num_kv_heads, p.head_dim, bs, slots, k.stride, v.stride},
              {k.arg, v.arg, step_.slot_mapping, kc, vc});
  if (path_ == AttentionPath::Prefill && p.head_dim % caps_.prefill_attention_head_dim_multiple == 0) {
    run("paged_attention_prefill_" + w + ax, PagedAttentionPrefillArgs{pa, max_query_len_},
                {q.arg, kc, vc, step_.block_tables, step_.query_start_loc, step_.seq_lens, out.arg});
  } else if (path_ == AttentionPath::Split) {
    run("paged_attention_split_" + w + ax,
                PagedAttentionSplitArgs{pa, caps_.split_attention_keys, partitions_},
                {q.arg, kc, vc, step_.block_tables, step_.query_start_loc, step_.seq_lens, part_max_.arg, part_sum_.arg,
                 part_out_.arg});
    run("paged_attention_reduce" + ax, PagedAttentionReduceArgs{T_, p.num_heads, p.head_dim, partitions_},
                {part_max_.arg, part_sum_.arg, part_out_.arg, out.arg});
  } else {
    run("paged_attention_" + w + ax, pa,
                {q.arg, kc, vc, step_.block_tables, step_.query_start_loc, step_.seq_lens, out.arg});
  }
}

void Ops::gated_activation(const char* op, const Tensor& gate_up, const Tensor& out) {
  check_rows(out, op);
  const int I = out.cols;
  if (gate_up.cols != 2 * I) throw std::logic_error(std::string(op) + ": gate_up needs 2 x the output's columns");
  run(op + act_suffix(), SiluMulArgs{gate_up.rows, I, gate_up.stride}, {gate_up.arg, gate_up.columns(I, I).arg, out.arg});
}

void Ops::silu_mul(const Tensor& gate_up, const Tensor& out) { gated_activation("silu_mul", gate_up, out); }
void Ops::gelu_tanh_mul(const Tensor& gate_up, const Tensor& out) { gated_activation("gelu_tanh_mul", gate_up, out); }

void Ops::moe(const Tensor& x, const Weight& router, const Weight& gate_up, const Weight& down, int num_experts,
              int top_k, bool renormalize, const Tensor& out) {
  check_rows(x, "moe input");
  check_rows(out, "moe output");
  const int T = x.rows, H = x.cols, E = num_experts, K = top_k, I = int(down.cols());
  if (router.rows() != E || gate_up.rows() != int64_t(E) * 2 * I || down.rows() != int64_t(E) * H || K < 1 || K > E)
    throw std::logic_error("moe: the router and expert weights disagree with num_experts / top_k");
  Tensor logits = linear_f32(x, router, "router logits");                   // f32 [T, E]
  Tensor ids = alloc_i32(T, K, "expert ids");                              // i32 [T, K]
  Tensor weights = alloc_f32(T, K, "expert weights");                      // f32 [T, K]
  run("moe_route", MoeRouteArgs{T, E, K, renormalize ? 1 : 0}, {logits.arg, ids.arg, weights.arg});
  Tensor gu = alloc(T * K, 2 * I, "experts' gate | up");                   // [T * K, 2I]
  run(kernel_name("moe_matmul", gate_up.dtype), MoeMatmulArgs{T * K, 2 * I, H, E, K}, {x.arg, gate_up.arg, ids.arg, gu.arg});
  Tensor act = alloc(T * K, I, "experts' silu(gate) * up");                // [T * K, I]
  silu_mul(gu, act);
  Tensor y = alloc(T * K, H, "experts' down");                             // [T * K, H]
  run(kernel_name("moe_matmul", down.dtype), MoeMatmulArgs{T * K, H, I, E, 1}, {act.arg, down.arg, ids.arg, y.arg});
  run("moe_combine" + act_suffix(), MoeCombineArgs{T, K, H}, {y.arg, weights.arg, out.arg});  // [T, H]
}

void Ops::softcap(const Tensor& x, float cap) {
  check_rows(x, "softcap");
  if (x.dtype != DType::F32) throw std::logic_error("softcap: takes f32 (the logits)");
  if (x.rows > 0) run("softcap", SoftcapArgs{x.rows, x.cols, cap}, {x.arg, x.arg});
}

Tensor Ops::gather_logit_rows(const Tensor& x, const char* label) {
  check_rows(x, "gather_logit_rows");
  Tensor out = alloc(R_, x.cols, label);
  if (R_ == 0) return out;
  run("gather_rows" + act_suffix(), GatherRowsArgs{R_, x.cols}, {x.arg, step_.logits_indices, out.arg});
  return out;
}

}  // namespace metal_engine::models
