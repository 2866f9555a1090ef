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

  // Steps in flight. submit() validates and encodes a step (greedy: ending with the on-device argmax) and hands it
  // to the device without waiting; collect() waits for the oldest step not yet collected and copies its results out:
  // logits [rows, vocab] of a step submitted with greedy=false, the greedy tokens [rows] of a greedy one. At most
  // kMaxStepsInFlight steps are submitted and not collected, each with its own scratch pool (the second one grows
  // on demand), so step N+1 is encoded and its inputs uploaded while the device runs step N; the results of a
  // step are read only after its own wait. A greedy step's tokens also stay on the device for the next step's
  // StepInput::prev_token_rows. step() and step_greedy() are submit + collect, and need no step in flight.
  static constexpr int kMaxStepsInFlight = 2;
  uint64_t submit(const StepInput& in, bool greedy);
  void collect(uint64_t ticket, float* logits);     // a step submitted with greedy=false
  void collect(uint64_t ticket, int32_t* tokens);   // a greedy step
  int steps_in_flight() const;                      // submitted, not yet collected
  // The rows a step's results hold (its logits_indices), and whether it was submitted greedy.
  size_t result_rows(uint64_t ticket) const;
  bool result_is_greedy(uint64_t ticket) const;

 private:
  explicit Engine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace metal_engine
