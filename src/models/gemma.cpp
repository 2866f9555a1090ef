// Gemma 2 (Gemma Team 2024) and Gemma 3 (2025), text: a decoder with a norm before and after each block:
//   h = embed(tokens) * sqrt(hidden)
//   per layer:  h += post_attention_norm(o_proj(attention(rope(q), rope(k), v)))  with q, k, v from input_norm(h)
//               h += post_feedforward_norm(down_proj(gelu_tanh(gate) * up))      with gate, up from pre_feedforward_norm(h)
//   logits = lm_head(norm(h))                            (Gemma 2: softcapped, cap * tanh(logits / cap))
// Every RMSNorm multiplies by (1 + w): the weights are made 1 + w once, at load. Attention scales q . k by
// query_pre_attn_scalar^-1/2. Layers alternate sliding-window and full attention ("layer_types"; Gemma 3: five
// sliding to one full, each kind with its own RoPE base; Gemma 2: even layers slide). Gemma 3 RMS-norms q and k
// per head before RoPE; Gemma 2 softcaps the attention scores, cap * tanh(score / cap).
#include <cmath>
#include <cstring>

#include "../core/half.h"
#include "model.h"

namespace metal_engine::models {
namespace {

struct GemmaLayer {
  Weight input_norm;              // [H]        (1 + w)
  Weight qkv_proj;                // [QD + 2 KD, H]: q_proj | k_proj | v_proj
  Weight q_norm, k_norm;          // [hd], [hd] (1 + w)  Gemma 3
  Weight o_proj;                  // [H, QD]
  Weight post_attention_norm;     // [H]        (1 + w)
  Weight pre_feedforward_norm;    // [H]        (1 + w)
  Weight gate_up_proj;            // [2 I, H]: gate_proj | up_proj
  Weight down_proj;               // [H, I]
  Weight post_feedforward_norm;   // [H]        (1 + w)
};

class Gemma : public Model {
 public:
  Gemma(const ConfigReader& j, ModelConfig& c) {
    gemma3_ = c.architecture == "Gemma3ForCausalLM";
    const std::string act = j.get_str("hidden_activation", j.get_str("hidden_act", "gelu_pytorch_tanh"));
    if (act != "gelu_pytorch_tanh" && act != "gelu_tanh")
      j.fail("hidden_activation '" + act + "' is not supported by " + c.architecture + " (only 'gelu_pytorch_tanh')");
    if (c.intermediate_size <= 0) j.fail("missing required field 'intermediate_size'");
    if (j.get_bool("attention_bias", false)) j.fail("attention_bias is not supported by " + c.architecture);
    if (j.get_bool("use_bidirectional_attention", false))
      j.fail("use_bidirectional_attention is not supported (metal_engine runs causal decoders)");
    query_scale_ = float(1.0 / std::sqrt(j.get_num("query_pre_attn_scalar", c.head_dim)));
    attn_softcap_ = float(j.get_num("attn_logit_softcapping", 0.0));
    final_softcap_ = float(j.get_num("final_logit_softcapping", 0.0));
    if (attn_softcap_ < 0 || final_softcap_ < 0) j.fail("softcapping values must be >= 0");
    c.tie_word_embeddings = j.get_bool("tie_word_embeddings", true);
    // Which layers slide: layer_types, else Gemma 3's sliding_window_pattern (every 6th full), Gemma 2's
    // alternation (even layers slide).
    c.sliding_window = j.get_int("sliding_window", 4096);
    if (j.has("layer_types")) {
      read_layer_types(j, c);
    } else {
      const int pattern = gemma3_ ? j.get_int("sliding_window_pattern", 6) : 2;
      for (int l = 0; l < c.num_layers; ++l) c.layer_uses_sliding_window[size_t(l)] = pattern > 0 && (l + 1) % pattern != 0;
    }
    // RoPE per layer kind: rope_parameters per layer type (transformers 5), else rope_theta / rope_scaling for
    // the full layers and rope_local_base_freq for the sliding ones.
    const bool nested = j.has("rope_parameters") && j.child("rope_parameters").has("sliding_attention");
    if (!gemma3_) {  // Gemma 2: one RoPE for every layer
      global_params_ = local_params_ = read_rope_params(j, c.head_dim, c.max_position_embeddings, "", 1e4);
    } else if (nested) {
      global_params_ = read_rope_params(j, c.head_dim, c.max_position_embeddings, "full_attention", 1e6);
      local_params_ = read_rope_params(j, c.head_dim, c.max_position_embeddings, "sliding_attention", 1e4);
    } else {
      global_params_ = read_rope_params(j, c.head_dim, c.max_position_embeddings, "", 1e6);
      local_params_ = RopeParams{};  // the sliding layers: no scaling, their own base
      local_params_.head_dim = local_params_.rotary_dim = c.head_dim;
      local_params_.max_position_embeddings = local_params_.original_max_position_embeddings = c.max_position_embeddings;
      local_params_.theta = j.get_num("rope_local_base_freq", 1e4);
    }
    if (global_params_.rotary_dim != c.head_dim || local_params_.rotary_dim != c.head_dim)
      j.fail("partial_rotary_factor is not used by " + c.architecture);
    c.rope_theta = float(global_params_.theta);
    c.rope_type = global_params_.type;
    c_ = c;
  }

  void load(WeightLoader& w) override {
    const int64_t H = c_.hidden_size, I = c_.intermediate_size, V = c_.vocab_size, hd = c_.head_dim;
    const int64_t QD = int64_t(c_.num_heads) * hd, KD = int64_t(c_.num_kv_heads) * hd;
    embed_tokens_ = w.get("model.embed_tokens.weight", {V, H});
    final_norm_ = w.get_plus_one("model.norm.weight", {H});
    lm_head_ = c_.tie_word_embeddings ? embed_tokens_ : w.get("lm_head.weight", {V, H});
    layers_.resize(size_t(c_.num_layers));
    for (int l = 0; l < c_.num_layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      GemmaLayer& L = layers_[size_t(l)];
      L.input_norm = w.get_plus_one(p + "input_layernorm.weight", {H});
      L.qkv_proj = w.fused({{p + "self_attn.q_proj.weight", {QD, H}},
                            {p + "self_attn.k_proj.weight", {KD, H}},
                            {p + "self_attn.v_proj.weight", {KD, H}}});
      if (gemma3_) {
        L.q_norm = w.get_plus_one(p + "self_attn.q_norm.weight", {hd});
        L.k_norm = w.get_plus_one(p + "self_attn.k_norm.weight", {hd});
      }
      L.o_proj = w.get(p + "self_attn.o_proj.weight", {H, QD});
      L.post_attention_norm = w.get_plus_one(p + "post_attention_layernorm.weight", {H});
      L.pre_feedforward_norm = w.get_plus_one(p + "pre_feedforward_layernorm.weight", {H});
      L.gate_up_proj = w.fused({{p + "mlp.gate_proj.weight", {I, H}}, {p + "mlp.up_proj.weight", {I, H}}});
      L.down_proj = w.get(p + "mlp.down_proj.weight", {H, I});
      L.post_feedforward_norm = w.get_plus_one(p + "post_feedforward_layernorm.weight", {H});
    }
    global_rope_ = make_rope(w, global_params_, "rope inv_freq (full attention)");
    local_rope_ = make_rope(w, local_params_, "rope inv_freq (sliding attention)");
    // transformers multiplies the embedding by sqrt(hidden) rounded to the weights' dtype
    embed_scale_ = round_to(std::sqrt(float(H)), embed_tokens_.dtype);
  }

  Tensor forward(Ops& ops) override {
    const int T = ops.num_tokens(), H = c_.hidden_size, I = c_.intermediate_size, hd = c_.head_dim;
    const int QD = c_.num_heads * hd, KD = c_.num_kv_heads * hd;
    const float eps = c_.rms_norm_eps;
    const Tensor global_freq = ops.rope_table(global_rope_), local_freq = ops.rope_table(local_rope_);
    Tensor residual = ops.alloc(T, H, "residual");   // [T, H]  the residual stream
    Tensor h = ops.alloc(T, H, "h");                 // [T, H]  normed input / block output
    ops.embedding(embed_tokens_, residual, embed_scale_);  // residual = embed(token_ids) * sqrt(H)
    ops.rms_norm(residual, layers_[0].input_norm, eps, h);
    for (int l = 0; l < c_.num_layers; ++l) {
      const GemmaLayer& L = layers_[size_t(l)];
      const bool sliding = c_.layer_uses_sliding_window[size_t(l)];
      Ops::Scope layer_scratch(ops);  // this layer's temporaries are the next one's
      Tensor qkv = ops.linear(h, L.qkv_proj, Weight{}, "qkv");   // [T, QD + 2 KD] = q | k | v
      Tensor q = qkv.columns(0, QD), k = qkv.columns(QD, KD), v = qkv.columns(QD + KD, KD);
      if (gemma3_) ops.qk_norm(q, k, L.q_norm, L.k_norm, c_.num_heads, c_.num_kv_heads, eps);
      ops.rope(sliding ? local_rope_ : global_rope_, sliding ? local_freq : global_freq, q, k, c_.num_heads,
               c_.num_kv_heads);
      AttentionParams attn{c_.num_heads, c_.num_kv_heads, hd, query_scale_, sliding ? c_.sliding_window : 0,
                           attn_softcap_};
      Tensor o = ops.alloc(T, QD, "attn");                       // [T, heads * hd]
      ops.attention(l, q, k, v, attn, o);
      ops.linear(o, L.o_proj, Weight{}, h);                      // [T, H]
      ops.rms_norm(h, L.post_attention_norm, eps, h);            // h = post_attention_norm(h)
      ops.add_rms_norm(h, residual, L.pre_feedforward_norm, eps, h);  // residual += h; h = pre_ff_norm(residual)
      // GeGLU MLP: down(gelu_tanh(gate(h)) * up(h))
      Tensor gate_up = ops.linear(h, L.gate_up_proj, Weight{}, "gate_up");  // [T, 2I] = gate | up
      Tensor act = ops.alloc(T, I, "gelu_tanh(gate) * up");                // [T, I]
      ops.gelu_tanh_mul(gate_up, act);
      ops.linear(act, L.down_proj, Weight{}, h);                           // [T, H]
      ops.rms_norm(h, L.post_feedforward_norm, eps, h);                    // h = post_ff_norm(h)
      if (l + 1 < c_.num_layers)  // residual += h; h = input_norm(residual) of the next layer
        ops.add_rms_norm(h, residual, layers_[size_t(l) + 1].input_norm, eps, h);
    }
    Tensor sel_res = ops.gather_logit_rows(residual, "selected residual");  // [R, H]
    Tensor sel_h = ops.gather_logit_rows(h, "selected h");                  // [R, H]
    ops.add_rms_norm(sel_h, sel_res, final_norm_, eps, sel_h);
    Tensor logits = ops.logits(sel_h, lm_head_);                            // f32 [R, V]
    if (final_softcap_ > 0.0f) ops.softcap(logits, final_softcap_);          // cap * tanh(logits / cap)
    return logits;
  }

 private:
  static float round_to(float x, DType t);

  ModelConfig c_;
  bool gemma3_ = false;
  float query_scale_ = 1.0f, embed_scale_ = 1.0f, attn_softcap_ = 0.0f, final_softcap_ = 0.0f;
  RopeParams global_params_, local_params_;
  RotaryEmbedding global_rope_, local_rope_;  // full-attention layers, sliding-window layers
  Weight embed_tokens_, final_norm_, lm_head_;  // [V, H], [H] (1 + w), [V, H] (embed_tokens_ when tied)
  std::vector<GemmaLayer> layers_;
};

float Gemma::round_to(float x, DType t) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if (t == DType::BF16) {
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000u;  // round to nearest even
  } else if (t == DType::F16) {
    return half_to_float(float_to_half(x));
  } else {
    return x;
  }
  std::memcpy(&x, &u, 4);
  return x;
}

}  // namespace

Architecture gemma_family() {
  return Architecture{{"Gemma3ForCausalLM", "Gemma2ForCausalLM"},
                      {"gemma3_text", "gemma2"},
                      [](const ConfigReader& j, ModelConfig& c) -> std::unique_ptr<Model> {
                        return std::make_unique<Gemma>(j, c);
                      }};
}

}  // namespace metal_engine::models
