// Engine: a loaded model on one device, with its paged KV cache and scratch pool.
// Engine::step runs one forward over a StepInput and returns fp32 logits for the requested rows.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "metal_engine/config.h"
#include "metal_engine/device.h"
#include "metal_engine/kv_cache.h"
#include "metal_engine/scratch_pool.h"
#include "metal_engine/step_input.h"

namespace metal_engine {

class Engine {
 public:
  // Loads a Hugging Face checkpoint folder (config.json + model.safetensors, or shards listed in
  // model.safetensors.index.json). Bad input throws std::invalid_argument naming file and problem.
  static std::unique_ptr<Engine> from_checkpoint(const std::string& dir, EngineConfig config = {});
  ~Engine();

  const ModelConfig& model_config() const;
  const EngineConfig& engine_config() const;
  DType dtype() const;  // float weights (quantized ones keep their format)
  DType kv_cache_dtype() const;
  DType activation_dtype() const;  // residual stream and every activation (logits are always f32)
  Device& device();
  PagedKVCache& kv_cache();
  ScratchPool& scratch_pool();

  // Throws std::invalid_argument / std::out_of_range describing the first problem found.
  void validate(const StepInput& in) const;
  // One forward: writes logits [in.logits_indices.size(), vocab_size] (fp32, row-major) to `logits`.
  void step(const StepInput& in, float* logits);
  std::vector<float> step(const StepInput& in);

  struct Impl;  // opaque: src/core/engine.cpp
  // The same forward, then the greedy token of every requested row (the first index of its largest logit)
  // chosen on the device: reads back one int per row instead of the logits.
  void step_greedy(const StepInput& in, int32_t* tokens);

 private:
  explicit Engine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace metal_engine
