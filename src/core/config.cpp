#include "metal_engine/config.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <stdexcept>

#include "json.h"

namespace metal_engine {

void EngineConfig::apply_env() {
  if (const char* v = std::getenv("VLLM_METAL_SCRATCH_POOL_MB")) {
    char* end = nullptr;
    errno = 0;
    long long mb = std::strtoll(v, &end, 10);
    if (end == v || *end != '\0' || errno != 0 || mb <= 0)
      throw std::invalid_argument(std::string("VLLM_METAL_SCRATCH_POOL_MB='") + v +
                                  "' is not a positive whole number of MiB (e.g. 512)");
    scratch_pool_mb = size_t(mb);
  }
}

namespace {

[[noreturn]] void bad(const std::string& source, const std::string& what) {
  throw std::invalid_argument(source + ": " + what);
}

const json::Value* member(const json::Value& obj, const std::string& key) {
  const json::Value* v = obj.find(key);
  return (v && !v->is_null()) ? v : nullptr;
}

int get_int(const json::Value& obj, const std::string& key, const std::string& source, int fallback,
            bool required) {
  const json::Value* v = member(obj, key);
  if (!v) {
    if (required) bad(source, "missing required field '" + key + "'");
    return fallback;
  }
  if (!v->is_number() || v->number != std::floor(v->number) || v->number < 0 || v->number > 2147483647.0)
    bad(source, "field '" + key + "' must be a non-negative integer");
  return int(v->number);
}

double get_num(const json::Value& obj, const std::string& key, const std::string& source, double fallback) {
  const json::Value* v = member(obj, key);
  if (!v) return fallback;
  if (!v->is_number()) bad(source, "field '" + key + "' must be a number");
  return v->number;
}

bool get_bool(const json::Value& obj, const std::string& key, bool fallback) {
  const json::Value* v = member(obj, key);
  return (v && v->kind == json::Value::Kind::Bool) ? v->boolean : fallback;
}

std::string get_str(const json::Value& obj, const std::string& key) {
  const json::Value* v = member(obj, key);
  return (v && v->is_string()) ? v->string : std::string();
}

}  // namespace

ModelConfig ModelConfig::from_json(const std::string& text, const std::string& source) {
  json::Value root = json::parse(text, source);
  if (!root.is_object()) bad(source, "expected a JSON object");
  ModelConfig c;

  // Architecture: "architectures" (saved by a model) or "model_type" (saved by a bare config).
  if (const json::Value* a = member(root, "architectures"); a && a->is_array() && !a->array.empty() &&
                                                           a->array[0].is_string())
    c.architecture = a->array[0].string;
  else {
    std::string mt = get_str(root, "model_type");
    if (mt == "llama") c.architecture = "LlamaForCausalLM";
    else if (mt == "mistral") c.architecture = "MistralForCausalLM";
    else if (mt == "qwen2") c.architecture = "Qwen2ForCausalLM";
    else c.architecture = mt.empty() ? std::string("<none>") : mt;
  }
  const bool llama = c.architecture == "LlamaForCausalLM";
  const bool mistral = c.architecture == "MistralForCausalLM";
  const bool qwen2 = c.architecture == "Qwen2ForCausalLM";
  if (!llama && !mistral && !qwen2)
    bad(source, "unsupported architecture '" + c.architecture +
                    "': metal_engine runs LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM");

  std::string act = get_str(root, "hidden_act");
  if (!act.empty() && act != "silu")
    bad(source, "hidden_act '" + act + "' is not supported (only 'silu')");

  c.vocab_size = get_int(root, "vocab_size", source, 0, true);
  c.hidden_size = get_int(root, "hidden_size", source, 0, true);
  c.intermediate_size = get_int(root, "intermediate_size", source, 0, true);
  c.num_layers = get_int(root, "num_hidden_layers", source, 0, true);
  c.num_heads = get_int(root, "num_attention_heads", source, 0, true);
  c.num_kv_heads = get_int(root, "num_key_value_heads", source, c.num_heads, false);
  if (c.vocab_size <= 0 || c.hidden_size <= 0 || c.intermediate_size <= 0 || c.num_layers <= 0 ||
      c.num_heads <= 0 || c.num_kv_heads <= 0)
    bad(source, "vocab_size, hidden_size, intermediate_size, num_hidden_layers and head counts must be > 0");
  int default_head_dim = c.hidden_size / c.num_heads;
  c.head_dim = get_int(root, "head_dim", source, default_head_dim, false);
  if (c.head_dim <= 0 || c.head_dim % 2 != 0) bad(source, "head_dim must be a positive even number");
  if (c.num_heads % c.num_kv_heads != 0)
    bad(source, "num_attention_heads (" + std::to_string(c.num_heads) +
                    ") must be a multiple of num_key_value_heads (" + std::to_string(c.num_kv_heads) + ")");
  c.max_position_embeddings = get_int(root, "max_position_embeddings", source, 2048, false);
  c.rms_norm_eps = float(get_num(root, "rms_norm_eps", source, 1e-6));
  c.tie_word_embeddings = get_bool(root, "tie_word_embeddings", false);

  // RoPE: transformers 5 writes "rope_parameters"; older configs "rope_theta" + "rope_scaling".
  const json::Value* rope = member(root, "rope_parameters");
  if (!rope) rope = member(root, "rope_scaling");
  c.rope_theta = float(get_num(root, "rope_theta", source, 10000.0));
  if (rope && rope->is_object()) {
    c.rope_theta = float(get_num(*rope, "rope_theta", source, c.rope_theta));
    std::string type = get_str(*rope, "rope_type");
    if (type.empty()) type = get_str(*rope, "type");
    if (type.empty() || type == "default") {
      c.rope_scaling.kind = RopeScalingKind::None;
    } else if (type == "linear") {
      c.rope_scaling.kind = RopeScalingKind::Linear;
      c.rope_scaling.factor = float(get_num(*rope, "factor", source, 1.0));
    } else if (type == "llama3") {
      c.rope_scaling.kind = RopeScalingKind::Llama3;
      c.rope_scaling.factor = float(get_num(*rope, "factor", source, 8.0));
      c.rope_scaling.low_freq_factor = float(get_num(*rope, "low_freq_factor", source, 1.0));
      c.rope_scaling.high_freq_factor = float(get_num(*rope, "high_freq_factor", source, 4.0));
      c.rope_scaling.original_max_position_embeddings =
          get_int(*rope, "original_max_position_embeddings", source, 8192, false);
    } else {
      bad(source, "rope type '" + type + "' is not supported (default, linear, llama3)");
    }
    if (c.rope_scaling.factor <= 0) bad(source, "rope scaling factor must be > 0");
  }

  if (qwen2) {
    c.qkv_bias = true;
  } else if (llama) {
    c.qkv_bias = c.o_bias = get_bool(root, "attention_bias", false);
    c.mlp_bias = get_bool(root, "mlp_bias", false);
  }

  // Sliding window: per-layer "layer_types" when present; else Mistral applies it to every layer and
  // Qwen2 (use_sliding_window) to layers >= max_window_layers.
  c.layer_uses_sliding_window.assign(size_t(c.num_layers), false);
  int window = get_int(root, "sliding_window", source, 0, false);
  if (const json::Value* lt = member(root, "layer_types"); lt && lt->is_array()) {
    if (int(lt->array.size()) != c.num_layers)
      bad(source, "layer_types has " + std::to_string(lt->array.size()) + " entries for " +
                      std::to_string(c.num_layers) + " layers");
    for (int l = 0; l < c.num_layers; ++l) {
      const std::string& t = lt->array[size_t(l)].string;
      if (t == "sliding_attention") c.layer_uses_sliding_window[size_t(l)] = true;
      else if (t != "full_attention") bad(source, "layer_types entry '" + t + "' is not supported");
    }
  } else if (mistral && window > 0) {
    c.layer_uses_sliding_window.assign(size_t(c.num_layers), true);
  } else if (qwen2 && window > 0 && get_bool(root, "use_sliding_window", false)) {
    int first = get_int(root, "max_window_layers", source, 0, false);
    for (int l = first; l < c.num_layers; ++l) c.layer_uses_sliding_window[size_t(l)] = true;
  }
  bool any_sliding = false;
  for (bool b : c.layer_uses_sliding_window) any_sliding |= b;
  if (any_sliding && window <= 0) bad(source, "sliding attention layers need a positive sliding_window");
  c.sliding_window = any_sliding ? window : 0;

  std::string dt = get_str(root, "dtype");
  if (dt.empty()) dt = get_str(root, "torch_dtype");
  c.checkpoint_dtype = dt.empty() ? DType::F32 : dtype_from_string(dt);
  return c;
}

}  // namespace metal_engine
