// Llama (Touvron et al. 2023) and the models built like it: Mistral (sliding-window attention), Qwen2
// (q/k/v bias, sliding window on the upper layers), Qwen3 (no bias; q and k RMS-normed per head before RoPE) and
// Phi-3 / Phi-4-mini (qkv_proj and gate_up_proj stored fused; longrope; partial rotary), and their mixtures of
// experts, Mixtral (Mistral's attention) and Qwen3-MoE (Qwen3's), where the MLP is the top-k of E SwiGLU experts.
// A pre-norm decoder:
//   h = embed(tokens)
//   per layer:  h += o_proj(attention(rope(q), rope(k), v))   with q | k | v = qkv_proj(rms_norm(h))
//               (Qwen3: q, k = q_norm(q), k_norm(k) per head first)
//               h += down_proj(silu(gate) * up)               with gate | up = gate_up_proj(rms_norm(h))
//               (MoE layers: h += sum over the token's top-k experts e of p_e * down_e(silu(gate_e) * up_e))
//   logits = lm_head(rms_norm(h))
// q/k/v and gate/up are fused at load into one weight each (vLLM's QKVParallelLinear and
// MergedColumnParallelLinear): 4 matmuls a layer instead of 7.
#include <algorithm>
#include <cmath>

#include "model.h"

namespace metal_engine::models {
namespace {

struct LlamaLayer {
  Weight input_norm;           // [H]
  Weight qkv_proj, qkv_bias;   // [QD + 2 KD, H], [QD + 2 KD]: q_proj | k_proj | v_proj
  Weight q_norm, k_norm;       // [hd], [hd]                        (Qwen3)
  Weight o_proj, o_bias;       // [H, QD], [H]
  Weight post_attention_norm;  // [H]
  Weight gate_up_proj, gate_up_bias;  // [2 I, H], [2 I]: gate_proj | up_proj
  Weight down_proj, down_bias;        // [H, I], [H]
  bool moe = false;                   // a mixture-of-experts MLP instead:
  Weight router;                      // [E, H]
  Weight experts_gate_up;             // [E * 2 Ie, H]: expert e's gate_proj | up_proj at rows e * 2 Ie
  Weight experts_down;                // [E * H, Ie]:   expert e's down_proj at rows e * H
};

class Llama : public Model {
 public:
  Llama(const ConfigReader& j, ModelConfig& c) {
    const std::string act = j.get_str("hidden_act", "silu");
    if (act != "silu") j.fail("hidden_act '" + act + "' is not supported by " + c.architecture + " (only 'silu')");
    if (c.intermediate_size <= 0) j.fail("missing required field 'intermediate_size'");
    phi3_ = c.architecture == "Phi3ForCausalLM";
    if (phi3_ && (j.has("rope_parameters") || j.has("rope_scaling"))) {  // Phi-3's old names for longrope
      const ConfigReader r = j.child(j.has("rope_parameters") ? "rope_parameters" : "rope_scaling");
      const std::string t = r.get_str("rope_type", r.get_str("type", "default"));
      if (t != "default" && t != "longrope" && t != "su" && t != "yarn")
        r.fail("Phi-3 takes rope type 'default' or 'longrope' (got '" + t + "')");
      longrope_alias_ = t == "su" || t == "yarn";
    }
    rope_params_ = read_rope_params(j, c.head_dim, c.max_position_embeddings, "", 10000.0,
                                    longrope_alias_ ? "longrope" : "");
    if (rope_params_.rotary_dim != c.head_dim && !phi3_)
      j.fail("partial_rotary_factor is not used by " + c.architecture);
    c.rope_theta = float(rope_params_.theta);
    c.rope_type = rope_params_.type;
    const bool qwen2 = c.architecture == "Qwen2ForCausalLM";
    mixtral_ = c.architecture == "MixtralForCausalLM";
    qwen3_moe_ = c.architecture == "Qwen3MoeForCausalLM";
    const bool mistral = c.architecture == "MistralForCausalLM" || mixtral_;
    qk_norm_ = c.architecture == "Qwen3ForCausalLM" || qwen3_moe_;
    if (mixtral_ || qwen3_moe_) read_moe(j, c);
    if (qwen2) {
      qkv_bias_ = true;
    } else if (qk_norm_) {
      qkv_bias_ = o_bias_ = j.get_bool("attention_bias", false);
    } else if (!mistral && !phi3_) {
      qkv_bias_ = o_bias_ = j.get_bool("attention_bias", false);
      mlp_bias_ = j.get_bool("mlp_bias", false);
    }
    // Sliding window: per-layer "layer_types" when present; else Mistral slides on every layer and Qwen2
    // (use_sliding_window) on the layers from max_window_layers on.
    c.sliding_window = j.get_int("sliding_window", 0);
    if (j.has("layer_types")) {
      read_layer_types(j, c);
    } else if ((mistral || phi3_) && c.sliding_window > 0) {
      c.layer_uses_sliding_window.assign(size_t(c.num_layers), true);
    } else if ((qwen2 || qk_norm_) && c.sliding_window > 0 && j.get_bool("use_sliding_window", false)) {
      for (int l = j.get_int("max_window_layers", 0); l < c.num_layers; ++l) c.layer_uses_sliding_window[size_t(l)] = true;
    }
    c_ = c;
  }

  // Which layers are mixtures of experts, of how many experts, choosing how many.
  void read_moe(const ConfigReader& j, const ModelConfig& c) {
    num_experts_ = j.get_int("num_local_experts", j.get_int("num_experts", 0));
    top_k_ = j.get_int("num_experts_per_tok", 2);
    if (num_experts_ <= 0) j.fail("missing required field 'num_local_experts' (or 'num_experts')");
    if (top_k_ < 1 || top_k_ > num_experts_ || top_k_ > 32)
      j.fail("num_experts_per_tok must be in 1..min(32, num_experts) (got " + std::to_string(top_k_) + ")");
    renormalize_ = mixtral_ || j.get_bool("norm_topk_prob", false);  // Mixtral always renormalises the top-k
    expert_intermediate_ = mixtral_ ? c.intermediate_size : j.get_int("moe_intermediate_size", 0);
    if (expert_intermediate_ <= 0) j.fail("missing required field 'moe_intermediate_size'");
    moe_layer_.assign(size_t(c.num_layers), mixtral_);
    if (qwen3_moe_) {
      const int step = j.get_int("decoder_sparse_step", 1);
      std::vector<double> dense = j.get_num_list("mlp_only_layers");
      for (int l = 0; l < c.num_layers; ++l) {
        bool is_dense = std::find(dense.begin(), dense.end(), double(l)) != dense.end();
        moe_layer_[size_t(l)] = !is_dense && step > 0 && (l + 1) % step == 0;
      }
    }
  }

  void load(WeightLoader& w) override {
    const int64_t H = c_.hidden_size, I = c_.intermediate_size, V = c_.vocab_size;
    const int64_t QD = int64_t(c_.num_heads) * c_.head_dim, KD = int64_t(c_.num_kv_heads) * c_.head_dim;
    embed_tokens_ = w.get("model.embed_tokens.weight", {V, H});
    final_norm_ = w.get("model.norm.weight", {H});
    lm_head_ = c_.tie_word_embeddings ? embed_tokens_ : w.get("lm_head.weight", {V, H});
    layers_.resize(size_t(c_.num_layers));
    for (int l = 0; l < c_.num_layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      LlamaLayer& L = layers_[size_t(l)];
      L.input_norm = w.get(p + "input_layernorm.weight", {H});
      if (phi3_)  // stored fused
        L.qkv_proj = w.get(p + "self_attn.qkv_proj.weight", {QD + 2 * KD, H});
      else
        L.qkv_proj = w.fused({{p + "self_attn.q_proj.weight", {QD, H}},
                              {p + "self_attn.k_proj.weight", {KD, H}},
                              {p + "self_attn.v_proj.weight", {KD, H}}});
      if (qkv_bias_)
        L.qkv_bias = w.fused({{p + "self_attn.q_proj.bias", {QD}},
                              {p + "self_attn.k_proj.bias", {KD}},
                              {p + "self_attn.v_proj.bias", {KD}}});
      if (qk_norm_) {
        L.q_norm = w.get(p + "self_attn.q_norm.weight", {c_.head_dim});
        L.k_norm = w.get(p + "self_attn.k_norm.weight", {c_.head_dim});
      }
      L.o_proj = w.get(p + "self_attn.o_proj.weight", {H, QD});
      L.o_bias = w.get(p + "self_attn.o_proj.bias", {H}, o_bias_);
      L.post_attention_norm = w.get(p + "post_attention_layernorm.weight", {H});
      if (!moe_layer_.empty() && moe_layer_[size_t(l)]) {
        load_experts(w, p, L);
        continue;
      }
      if (phi3_)
        L.gate_up_proj = w.get(p + "mlp.gate_up_proj.weight", {2 * I, H});
      else
        L.gate_up_proj = w.fused({{p + "mlp.gate_proj.weight", {I, H}}, {p + "mlp.up_proj.weight", {I, H}}});
      if (mlp_bias_) L.gate_up_bias = w.fused({{p + "mlp.gate_proj.bias", {I}}, {p + "mlp.up_proj.bias", {I}}});
      L.down_proj = w.get(p + "mlp.down_proj.weight", {H, I});
      L.down_bias = w.get(p + "mlp.down_proj.bias", {H}, mlp_bias_);
    }
    rope_ = make_rope(w, rope_params_, "rope inv_freq");
  }

  // The router and every expert, stacked at load into one gate | up and one down weight (vLLM's FusedMoE).
  void load_experts(WeightLoader& w, const std::string& p, LlamaLayer& L) {
    const int64_t H = c_.hidden_size, Ie = expert_intermediate_, E = num_experts_;
    const std::string block = mixtral_ ? p + "block_sparse_moe." : p + "mlp.";
    L.moe = true;
    L.router = w.get(block + "gate.weight", {E, H});
    std::vector<std::pair<std::string, std::vector<int64_t>>> gate_up, down;
    for (int64_t e = 0; e < E; ++e) {
      const std::string x = block + "experts." + std::to_string(e) + ".";
      gate_up.push_back({x + (mixtral_ ? "w1.weight" : "gate_proj.weight"), {Ie, H}});
      gate_up.push_back({x + (mixtral_ ? "w3.weight" : "up_proj.weight"), {Ie, H}});
      down.push_back({x + (mixtral_ ? "w2.weight" : "down_proj.weight"), {H, Ie}});
    }
    L.experts_gate_up = w.fused(gate_up);
    L.experts_down = w.fused(down);
  }

  Tensor forward(Ops& ops) override {
    const int T = ops.num_tokens(), H = c_.hidden_size, I = c_.intermediate_size, hd = c_.head_dim;
    const int QD = c_.num_heads * hd, KD = c_.num_kv_heads * hd;
    const float eps = c_.rms_norm_eps;
    const Tensor inv_freq = ops.rope_table(rope_);      // f32 [hd / 2]
    Tensor residual = ops.alloc(T, H, "residual");      // [T, H]  the residual stream
    Tensor h = ops.alloc(T, H, "h");                    // [T, H]  normed input / block output
    ops.embedding(embed_tokens_, residual);             // residual = embed(token_ids)
    ops.rms_norm(residual, layers_[0].input_norm, eps, h);
    for (int l = 0; l < c_.num_layers; ++l) {
      const LlamaLayer& L = layers_[size_t(l)];
      Ops::Scope layer_scratch(ops);  // this layer's temporaries are the next one's
      // Self-attention: q, k, v projections, RoPE, write k, v to the paged cache, attend.
      Tensor qkv = ops.linear(h, L.qkv_proj, L.qkv_bias, "qkv");  // [T, QD + 2 KD] = q | k | v
      Tensor q = qkv.columns(0, QD), k = qkv.columns(QD, KD), v = qkv.columns(QD + KD, KD);
      if (qk_norm_) ops.qk_norm(q, k, L.q_norm, L.k_norm, c_.num_heads, c_.num_kv_heads, eps);
      ops.rope(rope_, inv_freq, q, k, c_.num_heads, c_.num_kv_heads);
      AttentionParams attn{c_.num_heads, c_.num_kv_heads, hd, 1.0f / std::sqrt(float(hd)),
                           c_.layer_uses_sliding_window[size_t(l)] ? c_.sliding_window : 0};
      Tensor o = ops.alloc(T, QD, "attn");                  // [T, heads * hd]
      ops.attention(l, q, k, v, attn, o);
      ops.linear(o, L.o_proj, L.o_bias, h);                 // [T, H]
      ops.add_rms_norm(h, residual, L.post_attention_norm, eps, h);  // residual += h; h = RMSNorm(residual)
      if (L.moe) {  // the token's top-k experts' SwiGLU MLPs, weighted by their router probabilities
        ops.moe(h, L.router, L.experts_gate_up, L.experts_down, num_experts_, top_k_, renormalize_, h);  // [T, H]
      } else {  // SwiGLU MLP: down(silu(gate(h)) * up(h))
        Tensor gate_up = ops.linear(h, L.gate_up_proj, L.gate_up_bias, "gate_up");  // [T, 2I] = gate | up
        Tensor act = ops.alloc(T, I, "silu(gate) * up");                         // [T, I]
        ops.silu_mul(gate_up, act);
        ops.linear(act, L.down_proj, L.down_bias, h);                            // [T, H]
      }
      if (l + 1 < c_.num_layers)  // residual += h; h = RMSNorm(residual) with the next layer's weight
        ops.add_rms_norm(h, residual, layers_[size_t(l) + 1].input_norm, eps, h);
    }
    // Only the rows that want logits go through the final norm and the LM head.
    Tensor sel_res = ops.gather_logit_rows(residual, "selected residual");  // [R, H]
    Tensor sel_h = ops.gather_logit_rows(h, "selected h");                  // [R, H]
    ops.add_rms_norm(sel_h, sel_res, final_norm_, eps, sel_h);
    return ops.logits(sel_h, lm_head_);                                     // f32 [R, V]
  }

 private:
  ModelConfig c_;
  bool qkv_bias_ = false, o_bias_ = false, mlp_bias_ = false, qk_norm_ = false, phi3_ = false, longrope_alias_ = false;
  bool mixtral_ = false, qwen3_moe_ = false, renormalize_ = false;  // mixtures of experts
  int num_experts_ = 0, top_k_ = 0, expert_intermediate_ = 0;
  std::vector<bool> moe_layer_;  // [num_layers]
  RopeParams rope_params_;
  RotaryEmbedding rope_;
  Weight embed_tokens_, final_norm_, lm_head_;  // [V, H], [H], [V, H] (lm_head_ is embed_tokens_ when tied)
  std::vector<LlamaLayer> layers_;
};

}  // namespace

Architecture llama_family() {
  return Architecture{{"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM",
                       "MixtralForCausalLM", "Qwen3MoeForCausalLM"},
                      {"llama", "mistral", "qwen2", "qwen3", "phi3", "mixtral", "qwen3_moe"},
                      [](const ConfigReader& j, ModelConfig& c) -> std::unique_ptr<Model> {
                        return std::make_unique<Llama>(j, c);
                      }};
}

}  // namespace metal_engine::models
