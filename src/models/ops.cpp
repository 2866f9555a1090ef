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
  for (int32_t p : in.positions) max_position_ = std::max(max_position_, int(p));
  // the tiled prefill kernel, where the backend has one for this head_dim (else long chunks take the per-row one)
  const bool prefill_kernel = caps_.prefill_attention_min_rows > 0 &&
                              head_dim % caps_.prefill_attention_head_dim_multiple == 0 &&
                              (caps_.prefill_attention_max_head_dim == 0 || head_dim <= caps_.prefill_attention_max_head_dim);
  auto path_of = [&](int s) {
    const int qlen = in.query_start_loc[size_t(s) + 1] - in.query_start_loc[size_t(s)];
    if (prefill_kernel && qlen >= caps_.prefill_attention_min_rows) return AttentionPath::Prefill;
    if (caps_.split_attention_keys > 0 && in.seq_lens[size_t(s)] > caps_.split_attention_keys) return AttentionPath::Split;
    if (caps_.fused_decode_attention && qlen == 1) return AttentionPath::FusedDecode;
    return AttentionPath::PerRow;
  };
  int split_rows = 0;  // rows x partitions of the largest split group
  for (int s = 0; s < S_; ++s) {
    const AttentionPath path = path_of(s);
    if (groups_.empty() || groups_.back().path != path) {
      AttentionGroup g;
      g.s0 = s;
      g.t0 = in.query_start_loc[size_t(s)];
      g.path = path;
      groups_.push_back(g);
    }
    AttentionGroup& g = groups_.back();
    g.s1 = s + 1;
    g.t1 = in.query_start_loc[size_t(s) + 1];
    g.max_query_len = std::max(g.max_query_len, g.t1 - in.query_start_loc[size_t(s)]);
    if (path == AttentionPath::Split) {
      g.partitions = std::max(g.partitions, (in.seq_lens[size_t(s)] + caps_.split_attention_keys - 1) /
                                                caps_.split_attention_keys);
      split_rows = std::max(split_rows, (g.t1 - g.t0) * g.partitions);
    }
  }
  for (AttentionGroup& g : groups_) {
    if (groups_.size() == 1) {
      g.query_start_loc = step_.query_start_loc;
      continue;
    }
    Tensor qsl = alloc_i32(1, g.s1 - g.s0 + 1, "query_start_loc of an attention group");  // i32 [S_g + 1]
    g.query_start_loc = qsl.arg;
    if (measuring_) continue;
    int32_t* dst = static_cast<int32_t*>(pool_.host_ptr(qsl.arg));
    for (int s = g.s0; s <= g.s1; ++s) dst[s - g.s0] = in.query_start_loc[size_t(s)] - g.t0;
  }
  if (split_rows > 0) {
    const int rows = split_rows * num_heads;
    part_max_ = alloc_f32(rows, 1, "attention partition max");          // f32 [T_g, heads, P]
    part_sum_ = alloc_f32(rows, 1, "attention partition sum");          // f32 [T_g, heads, P]
    part_out_ = alloc_f32(rows, head_dim, "attention partition out");   // f32 [T_g, heads, P, hd]
  }
}

std::string Ops::act_suffix() const { return act_ == DType::F32 ? "" : std::string("_act_") + dtype_name(act_); }

std::string Ops::kernel_name(const std::string& op, DType weight) const {
  return op + "_" + dtype_name(weight) + act_suffix();
}

std::string Ops::kernel_name(const std::string& op, const Weight& w) const {
  return op + "_" + w.format_name() + act_suffix();
}

const Weight& Ops::float_weight(const Weight& w, const char* op) const {
  if (w.quantized())
    throw std::invalid_argument(std::string(op) + " takes float weights, not " + w.format_name() +
                                " (quantized weights are for linear layers, embeddings and experts)");
  return w;
}

void Ops::check_rows(const Tensor& t, const char* what) const {
  if (!t.contiguous()) throw std::logic_error(std::string(what) + ": this op takes contiguous rows");
}

Tensor Ops::alloc_as(DType dtype, int rows, int cols, const char* label) {
  Tensor t;
  t.dtype = dtype;
  t.rows = rows;
  t.cols = t.stride = cols;
  t.arg = pool_.alloc(dtype_size(dtype) * size_t(std::max(rows, 1)) * size_t(cols), label);
  return t;
}

Tensor Ops::alloc(int rows, int cols, const char* label) { return alloc_as(act_, rows, cols, label); }
Tensor Ops::alloc_f32(int rows, int cols, const char* label) { return alloc_as(DType::F32, rows, cols, label); }
Tensor Ops::alloc_i32(int rows, int cols, const char* label) { return alloc_as(DType::I32, rows, cols, label); }

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
  if (step_.prev_token_rows.buffer)
    run("feed_tokens", FeedTokensArgs{T_, step_.prev_rows},
        {step_.prev_tokens, step_.prev_token_rows, step_.token_ids});
  run(kernel_name("embedding", table), EmbeddingArgs{T_, out.cols, int(table.rows()), scale},
              {step_.token_ids, table.arg, out.arg});
}

void Ops::linear(const Tensor& x, const Weight& w, const Weight& bias, const Tensor& y) {
  check_rows(x, "linear input");
  if (!w.parts.empty()) {  // parts in different formats: a matmul each, into its columns of y (and of the bias)
    int row = 0;
    for (const Weight& part : w.parts) {
      Weight b;
      if (bias.present()) {
        b = bias;
        b.arg.offset += size_t(row) * dtype_size(bias.dtype);
        b.shape = {part.rows()};
      }
      linear(x, part, b, y.columns(row, int(part.rows())));
      row += int(part.rows());
    }
    return;
  }
  if (x.cols != w.cols() || y.cols != w.rows() || x.rows != y.rows)
    throw std::logic_error("linear: x [" + std::to_string(x.rows) + ", " + std::to_string(x.cols) + "] W [" +
                           std::to_string(w.rows()) + ", " + std::to_string(w.cols()) + "] y [" +
                           std::to_string(y.rows) + ", " + std::to_string(y.cols) + "]");
  // a quantized matmul's bias is in any float type: has_bias says which (1 + its DType)
  const int has_bias = !bias.present() ? 0 : w.quantized() ? 1 + int(float_weight(bias, "a bias").dtype) : 1;
  run(kernel_name("matmul", w), MatmulArgs{x.rows, int(w.rows()), int(w.cols()), has_bias, y.stride},
      {x.arg, w.arg, bias.arg, y.arg});
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
  if (!w.parts.empty()) throw std::invalid_argument(std::string(label) + ": its weight's parts are in different formats");
  if (x.rows == 0) return y;
  // 16-bit activations: the _logits flavour of the matmul writes f32
  const std::string name = kernel_name("matmul", w) + (act_ == DType::F32 ? "" : "_logits");
  run(name, MatmulArgs{x.rows, int(w.rows()), int(w.cols()), 0, y.stride}, {x.arg, w.arg, BufferArg{}, y.arg});
  return y;
}

void Ops::rms_norm(const Tensor& x, const Weight& w, float eps, const Tensor& out) {
  check_rows(x, "rms_norm");
  check_rows(out, "rms_norm output");
  run(kernel_name("rms_norm", float_weight(w, "rms_norm").dtype), RmsNormArgs{x.rows, x.cols, eps, 0},
              {x.arg, BufferArg{}, w.arg, out.arg});
}

void Ops::add_rms_norm(const Tensor& x, const Tensor& residual, const Weight& w, float eps, const Tensor& out) {
  check_rows(x, "add_rms_norm");
  check_rows(residual, "add_rms_norm residual");
  check_rows(out, "add_rms_norm output");
  run(kernel_name("rms_norm", float_weight(w, "rms_norm").dtype), RmsNormArgs{x.rows, x.cols, eps, 1},
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
  run(kernel_name("qk_norm", float_weight(q_weight, "qk_norm").dtype), QKNormArgs{T_, num_heads, num_kv_heads, hd, q.stride, k.stride, eps},
      {q.arg, k.arg, q_weight.arg, k_weight.arg});
}

namespace {
// a binding `bytes` further on (its reach kept: a superset of what it binds, as the barrier tracking needs)
BufferArg at(BufferArg b, size_t bytes) { return BufferArg{b.buffer, b.offset + bytes, b.bytes}; }
}  // namespace

void Ops::attention(int layer, const Tensor& q, const Tensor& k, const Tensor& v, const AttentionParams& p,
                    const Tensor& out) {
  check_rows(out, "attention output");
  if (k.stride != v.stride) throw std::logic_error("attention: k and v need one row stride");
  const std::string w = dtype_name(kv_.shape().dtype);
  const std::string ax = act_suffix();
  const int bs = kv_.block_size(), W = in_.block_table_width, slots = int(kv_.num_slots());
  const BufferArg kc = kv_.key_cache(layer), vc = kv_.value_cache(layer);
  const size_t a = dtype_size(act_);
  for (const AttentionGroup& g : groups_) {
    const int S = g.s1 - g.s0, T = g.t1 - g.t0;
    // the group's rows, slots, seq_lens and block tables
    const BufferArg gq = at(q.arg, a * size_t(g.t0) * q.stride), gk = at(k.arg, a * size_t(g.t0) * k.stride),
                    gv = at(v.arg, a * size_t(g.t0) * v.stride), go = at(out.arg, a * size_t(g.t0) * out.stride);
    const BufferArg slot = at(step_.slot_mapping, sizeof(int64_t) * g.t0);
    const BufferArg lens = at(step_.seq_lens, sizeof(int32_t) * g.s0);
    const BufferArg bt = at(step_.block_tables, sizeof(int32_t) * size_t(g.s0) * W);
    const BufferArg qsl = g.query_start_loc;
    PagedAttentionArgs pa{S, p.num_heads, p.num_kv_heads, p.head_dim, bs, W, q.stride, p.sliding_window, p.scale, T,
                          p.softcap};
    if (g.path == AttentionPath::FusedDecode) {
      run("paged_attention_decode_" + w + ax, PagedAttentionDecodeArgs{pa, k.stride, v.stride, slots},
          {gq, gk, gv, slot, kc, vc, bt, qsl, lens, go});
      continue;
    }
    run("kv_write_" + w + ax, KVWriteArgs{T, p.num_kv_heads, p.head_dim, bs, slots, k.stride, v.stride},
        {gk, gv, slot, kc, vc});
    if (g.path == AttentionPath::Prefill) {
      run("paged_attention_prefill_" + w + ax, PagedAttentionPrefillArgs{pa, g.max_query_len},
          {gq, kc, vc, bt, qsl, lens, go});
    } else if (g.path == AttentionPath::Split) {
      run("paged_attention_split_" + w + ax, PagedAttentionSplitArgs{pa, caps_.split_attention_keys, g.partitions},
          {gq, kc, vc, bt, qsl, lens, part_max_.arg, part_sum_.arg, part_out_.arg});
      run("paged_attention_reduce" + ax, PagedAttentionReduceArgs{T, p.num_heads, p.head_dim, g.partitions},
          {part_max_.arg, part_sum_.arg, part_out_.arg, go});
    } else {
      run("paged_attention_" + w + ax, pa, {gq, kc, vc, bt, qsl, lens, go});
    }
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
  if (!gate_up.parts.empty() || !down.parts.empty())
    throw std::invalid_argument("moe: the experts' weights are in more than one format; metal_engine takes one per "
                                "projection (gate | up, down)");
  if (router.rows() != E || gate_up.rows() != int64_t(E) * 2 * I || down.rows() != int64_t(E) * H || K < 1 || K > E)
    throw std::logic_error("moe: the router and expert weights disagree with num_experts / top_k");
  Tensor logits = linear_f32(x, router, "router logits");                   // f32 [T, E]
  Tensor ids = alloc_i32(T, K, "expert ids");                              // i32 [T, K]
  Tensor weights = alloc_f32(T, K, "expert weights");                      // f32 [T, K]
  run("moe_route", MoeRouteArgs{T, E, K, renormalize ? 1 : 0}, {logits.arg, ids.arg, weights.arg});
  Tensor gu = alloc(T * K, 2 * I, "experts' gate | up");                   // [T * K, 2I]
  run(kernel_name("moe_matmul", gate_up), MoeMatmulArgs{T * K, 2 * I, H, E, K}, {x.arg, gate_up.arg, ids.arg, gu.arg});
  Tensor act = alloc(T * K, I, "experts' silu(gate) * up");                // [T * K, I]
  silu_mul(gu, act);
  Tensor y = alloc(T * K, H, "experts' down");                             // [T * K, H]
  run(kernel_name("moe_matmul", down), MoeMatmulArgs{T * K, H, I, E, 1}, {act.arg, down.arg, ids.arg, y.arg});
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
