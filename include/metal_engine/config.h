// Engine knobs (one struct: every default and unit is defined here once; the Python layer takes its defaults
// from it) and the model's config.json.
#pragma once
#include <cstddef>
#include <string>
#include <vector>

#include "metal_engine/dtype.h"

namespace metal_engine {

struct EngineConfig {
  std::string backend = "cpu";       // "cpu", and "metal" (Apple) or "metal-sim" (Linux) where built
  // weights + KV cache: auto | float32 | float16 | bfloat16. auto is vLLM's: bfloat16 checkpoints run in
  // bfloat16, float32 and float16 ones in float16 (resolve_dtype).
  std::string dtype = "auto";
  // activations (the residual stream, q/k/v, MLP): auto = the 16-bit dtype of the weights on Metal backends,
  // float32 on cpu (its reference); or float32, or the weights' 16-bit dtype (Metal backends only)
  std::string activation_dtype = "auto";
  // the KV cache (vLLM's kv_cache_dtype): auto = the weights' float dtype; or float32 | float16 | bfloat16 (fp32,
  // fp16, bf16). Quantized weights leave the float dtype to `dtype`.
  std::string kv_cache_dtype = "auto";
  int block_size = 16;               // tokens per KV-cache block
  size_t kv_cache_memory = size_t(256) << 20;  // bytes for K and V of all layers; sets the number of blocks
  int num_kv_blocks = 0;             // > 0 overrides kv_cache_memory
  size_t scratch_pool_mb = 512;      // per-step arena; env VLLM_METAL_SCRATCH_POOL_MB overrides
  int num_threads = 0;               // cpu backend worker threads; 0 = all cores

  // Applies the environment variables that map onto knobs (VLLM_METAL_SCRATCH_POOL_MB).
  // A malformed value throws std::invalid_argument naming the variable.
  void apply_env();
};

// The dtype a checkpoint saved in `checkpoint` runs in for the setting `dtype` ("auto" or a dtype name).
DType resolve_dtype(const std::string& dtype, DType checkpoint);

// What the engine core needs from a Hugging Face config.json: the shapes every decoder shares (KV cache,
// validation, scratch). Everything particular to an architecture is read by its file in src/models/.
struct ModelConfig {
  std::string architecture;  // config.json architectures[0], e.g. LlamaForCausalLM
  int vocab_size = 0;
  int hidden_size = 0;
  int intermediate_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int max_position_embeddings = 0;
  float rms_norm_eps = 1e-6f;
  float rope_theta = 10000.0f;
  std::string rope_type = "default";  // default | linear | llama3 | yarn | dynamic | longrope
  bool tie_word_embeddings = false;
  int sliding_window = 0;  // 0 = full attention
  std::vector<bool> layer_uses_sliding_window;  // [num_layers]
  // The window when every layer slides over it (Mistral, Phi-3), so a request's blocks before it can go; 0 when
  // any layer attends to the whole context (one block table serves all layers)
  int uniform_sliding_window() const {
    for (bool b : layer_uses_sliding_window)
      if (!b) return 0;
    return layer_uses_sliding_window.empty() ? 0 : sliding_window;
  }
  DType checkpoint_dtype = DType::F32;

  // Parses and validates config.json text (through the architecture registry, src/models/); `source` names
  // the file in errors.
  static ModelConfig from_json(const std::string& text, const std::string& source);
};

}  // namespace metal_engine
