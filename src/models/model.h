// The model-definition layer. Each architecture family is one file in src/models/ holding all that is
// particular to it: the config.json fields it reads, its weights' names and shapes, the load-time fusions,
// and its forward pass written against the ops API (ops.h). registry.cpp maps config.json's
// architectures[0] (or model_type) to the family. The engine core (src/core/engine.cpp) keeps the weights'
// storage, the step's validation, the scratch pool and the KV cache, and knows no architecture.
#pragma once
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "config_reader.h"
#include "metal_engine/config.h"
#include "ops.h"

namespace metal_engine::models {

// What a model asks of its checkpoint at load (the engine core implements it over safetensors: tensors in
// the engine's dtype are used in place, others converted once).
class WeightLoader {
 public:
  virtual ~WeightLoader() = default;
  virtual bool has(const std::string& name) const = 0;
  // The tensor `name`, checked to have `shape`; an empty Weight when absent and !required.
  virtual Weight get(const std::string& name, const std::vector<int64_t>& shape, bool required = true) = 0;
  // Tensors stacked along dim 0 into one weight (q | k | v, gate | up: one matmul instead of several); each is
  // checked like get's. With required false and every part absent, an empty Weight.
  virtual Weight fused(const std::vector<std::pair<std::string, std::vector<int64_t>>>& parts, bool required = true) = 0;
  // An RMSNorm weight stored as w for a norm that multiplies by (1 + w) (Gemma): 1 + w, converted once.
  virtual Weight get_plus_one(const std::string& name, const std::vector<int64_t>& shape) = 0;
  // A float32 table the model computes at load (RoPE inverse frequencies).
  virtual Weight constant(const std::vector<float>& values, const std::string& label) = 0;
};

class Model {
 public:
  virtual ~Model() = default;
  virtual void load(WeightLoader& weights) = 0;
  // One step's forward pass; returns the logits of the step's logit rows, f32 [R, vocab].
  virtual Tensor forward(Ops& ops) = 0;

  // Shared by the families: a RotaryEmbedding with its load-time table.
  static RotaryEmbedding make_rope(WeightLoader& weights, const RopeParams& params, const std::string& label);
};

// One entry of the registry.
struct Architecture {
  std::vector<std::string> names;        // config.json architectures[0]
  std::vector<std::string> model_types;  // config.json model_type (a config saved without architectures)
  // Reads the family's own config.json fields (the common ones are in `config` already, and the family may
  // refine them, e.g. which layers slide) and returns the model, weights not yet loaded.
  std::unique_ptr<Model> (*create)(const ConfigReader& json, ModelConfig& config);
};

// Shared config.json readers.
// "layer_types" (transformers 5): sliding_attention / full_attention per layer, into config.layer_uses_sliding_window.
void read_layer_types(const ConfigReader& json, ModelConfig& config);

// Every family (registry.cpp: one line each).
const std::vector<Architecture>& architectures();

// config.json's text -> the common config and the family's model. Errors name `source` and the field.
std::pair<ModelConfig, std::unique_ptr<Model>> read_model(const std::string& text, const std::string& source);

// The families, each defined in its own file.
Architecture llama_family();  // llama.cpp: Llama, Mistral, Qwen2, Qwen3, Phi-3, Mixtral, Qwen3-MoE
Architecture gemma_family();  // gemma.cpp: Gemma 2, Gemma 3 (text)

}  // namespace metal_engine::models
