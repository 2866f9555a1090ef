// Rotary position embedding: config.json's RoPE parameters (every type the model families use: default,
// linear, llama3, yarn, dynamic NTK, longrope) and the inverse frequencies / cos-sin scaling each implies,
// computed as transformers' modeling_rope_utils does.
#pragma once
#include <string>
#include <vector>

#include "config_reader.h"

namespace metal_engine::models {

struct RopeParams {
  std::string type = "default";  // default | linear | llama3 | yarn | dynamic | longrope
  double theta = 10000.0;
  int head_dim = 0;
  int rotary_dim = 0;  // head_dim * partial_rotary_factor: the leading dims of each head that rotate
  int max_position_embeddings = 0;
  int original_max_position_embeddings = 0;
  double factor = 1.0;
  double low_freq_factor = 1.0, high_freq_factor = 4.0;  // llama3
  double beta_fast = 32.0, beta_slow = 1.0;              // yarn
  bool truncate = true;                                  // yarn
  double attention_factor = 1.0;                         // yarn, longrope: cos and sin are scaled by it
  std::vector<double> short_factor, long_factor;         // longrope, [rotary_dim / 2] each

  // The inverse frequencies [rotary_dim / 2] for a step whose largest position is max_position (dynamic NTK
  // and longrope depend on it, as transformers' dynamic_rope_update does per forward).
  std::vector<float> inv_freq(int max_position) const;
  // Whether inv_freq() depends on the step (dynamic NTK; longrope with distinct short and long factors).
  bool per_step() const;
};

// Reads the RoPE parameters of a config.json: "rope_parameters" (transformers 5) or "rope_theta" +
// "rope_scaling" (older), partial_rotary_factor at the top level or inside. `layer_type` selects one entry
// of a per-layer-type rope_parameters (Gemma 3: "sliding_attention" / "full_attention"). A type or field we
// cannot honour is an error naming it.
// `type_override` replaces the stored type (Phi-3 reads its old "su" / "yarn" as longrope, as transformers does).
RopeParams read_rope_params(const ConfigReader& config, int head_dim, int max_position_embeddings,
                            const std::string& layer_type = "", double default_theta = 10000.0,
                            const std::string& type_override = "");

}  // namespace metal_engine::models
