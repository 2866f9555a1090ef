// The architecture registry, and the config.json fields every family shares.
#include <stdexcept>

#include "model.h"

namespace metal_engine::models {

const std::vector<Architecture>& architectures() {
  static const std::vector<Architecture> all = {
      llama_family(),
      gemma_family(),
  };
  return all;
}

namespace {

// The fields every decoder-only family has (the family checks and refines them).
void read_common(const ConfigReader& j, ModelConfig& c) {
  c.vocab_size = j.require_int("vocab_size");
  c.hidden_size = j.require_int("hidden_size");
  c.intermediate_size = j.get_int("intermediate_size", 0);
  c.num_layers = j.require_int("num_hidden_layers");
  c.num_heads = j.require_int("num_attention_heads");
  c.num_kv_heads = j.get_int("num_key_value_heads", c.num_heads);
  if (c.vocab_size <= 0 || c.hidden_size <= 0 || c.num_layers <= 0 || c.num_heads <= 0 || c.num_kv_heads <= 0)
    j.fail("vocab_size, hidden_size, num_hidden_layers and head counts must be > 0");
  c.head_dim = j.get_int("head_dim", c.hidden_size / c.num_heads);
  if (c.head_dim <= 0 || c.head_dim % 2 != 0) j.fail("head_dim must be a positive even number");
  if (c.num_heads % c.num_kv_heads != 0)
    j.fail("num_attention_heads (" + std::to_string(c.num_heads) + ") must be a multiple of num_key_value_heads (" +
           std::to_string(c.num_kv_heads) + ")");
  c.max_position_embeddings = j.get_int("max_position_embeddings", 2048);
  c.rms_norm_eps = float(j.get_num("rms_norm_eps", 1e-6));
  c.tie_word_embeddings = j.get_bool("tie_word_embeddings", false);
  c.layer_uses_sliding_window.assign(size_t(c.num_layers), false);
  std::string dt = j.get_str("dtype", j.get_str("torch_dtype"));
  c.checkpoint_dtype = dt.empty() ? DType::F32 : dtype_from_string(dt);
}

}  // namespace

std::pair<ModelConfig, std::unique_ptr<Model>> read_model(const std::string& text, const std::string& source) {
  json::Value root = json::parse(text, source);
  if (!root.is_object()) throw std::invalid_argument(source + ": expected a JSON object");
  ConfigReader j(root, source);

  // The architecture: "architectures" (saved with a model) or "model_type" (a bare config).
  std::string name, model_type = j.has("model_type") && j.find("model_type")->is_string() ? j.get_str("model_type") : "";
  if (const json::Value* a = j.find("architectures"); a && a->is_array() && !a->array.empty() && a->array[0].is_string())
    name = a->array[0].string;
  const Architecture* arch = nullptr;
  std::string all;
  for (const Architecture& family : architectures()) {
    for (const std::string& n : family.names) {
      all += (all.empty() ? "" : ", ") + n;
      if (!name.empty() && n == name) arch = &family;
    }
    if (name.empty())
      for (size_t i = 0; i < family.model_types.size(); ++i)
        if (family.model_types[i] == model_type) {
          arch = &family;
          name = family.names[i < family.names.size() ? i : 0];
        }
  }
  if (!arch) {
    const std::string shown = !name.empty() ? name : !model_type.empty() ? model_type : std::string("<none>");
    j.fail("unsupported architecture '" + shown + "': metal_engine runs " + all);
  }
  ModelConfig c;
  c.architecture = name;
  read_common(j, c);
  std::unique_ptr<Model> model = arch->create(j, c);
  bool any_sliding = false;
  for (bool b : c.layer_uses_sliding_window) any_sliding |= b;
  if (any_sliding && c.sliding_window <= 0) j.fail("sliding attention layers need a positive sliding_window");
  if (!any_sliding) c.sliding_window = 0;
  return {std::move(c), std::move(model)};
}

void read_layer_types(const ConfigReader& j, ModelConfig& c) {
  const json::Value* lt = j.find("layer_types");
  if (!lt) return;
  if (!lt->is_array() || int(lt->array.size()) != c.num_layers)
    j.fail("layer_types must list one entry for each of the " + std::to_string(c.num_layers) + " layers");
  for (int l = 0; l < c.num_layers; ++l) {
    const json::Value& t = lt->array[size_t(l)];
    const std::string s = t.is_string() ? t.string : "<not a string>";
    if (s == "sliding_attention") c.layer_uses_sliding_window[size_t(l)] = true;
    else if (s == "full_attention") c.layer_uses_sliding_window[size_t(l)] = false;
    else j.fail("layer_types entry '" + s + "' is not supported (sliding_attention, full_attention)");
  }
}

RotaryEmbedding Model::make_rope(WeightLoader& weights, const RopeParams& params, const std::string& label) {
  RotaryEmbedding r;
  r.params = params;
  if (!params.per_step()) r.inv_freq = weights.constant(params.inv_freq(0), label);
  return r;
}

}  // namespace metal_engine::models
