#include "rope.h"

#include <algorithm>
#include <cmath>

namespace metal_engine::models {

namespace {

double yarn_mscale(double scale, double mscale) { return scale <= 1.0 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0; }

}  // namespace

bool RopeParams::per_step() const {
  return type == "dynamic" || (type == "longrope" && short_factor != long_factor);
}

std::vector<float> RopeParams::inv_freq(int max_position) const {
  const int half = rotary_dim / 2;
  const double dim = rotary_dim;
  const int seq_len = max_position + 1;
  double base = theta;
  if (type == "dynamic") {  // NTK-aware base for contexts past max_position_embeddings
    const double s = std::max(seq_len, max_position_embeddings);
    base = theta * std::pow(factor * s / max_position_embeddings - (factor - 1.0), dim / (dim - 2.0));
  }
  std::vector<float> out(static_cast<size_t>(half));
  // yarn: the correction range of dims that interpolate vs extrapolate
  double low = 0, high = 0;
  if (type == "yarn") {
    auto corr = [&](double rotations) {
      return dim * std::log(original_max_position_embeddings / (rotations * 2.0 * M_PI)) / (2.0 * std::log(base));
    };
    low = corr(beta_fast);
    high = corr(beta_slow);
    if (truncate) {
      low = std::floor(low);
      high = std::ceil(high);
    }
    low = std::max(low, 0.0);
    high = std::min(high, dim - 1.0);
    if (low == high) high += 0.001;
  }
  const bool use_long = type == "longrope" && seq_len > original_max_position_embeddings;
  for (int i = 0; i < half; ++i) {
    // transformers computes base ** (arange(0, dim, 2) / dim) in float32
    const float expo = float(2 * i) / float(rotary_dim);
    const double pos_freq = double(std::pow(float(base), expo));
    double f = 1.0 / pos_freq;
    if (type == "linear") {
      f /= factor;
    } else if (type == "llama3") {
      const double old_ctx = original_max_position_embeddings;
      const double low_wavelen = old_ctx / low_freq_factor, high_wavelen = old_ctx / high_freq_factor;
      const double wavelen = 2.0 * M_PI / f;
      if (wavelen > low_wavelen) {
        f = f / factor;
      } else if (wavelen >= high_wavelen) {
        const double smooth = (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
        f = (1.0 - smooth) * f / factor + smooth * f;
      }
    } else if (type == "yarn") {
      const double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
      const double extrapolation = 1.0 - ramp;
      f = (f / factor) * (1.0 - extrapolation) + f * extrapolation;
    } else if (type == "longrope") {
      f = 1.0 / ((use_long ? long_factor : short_factor)[size_t(i)] * pos_freq);
    }
    out[size_t(i)] = float(f);
  }
  return out;
}

RopeParams read_rope_params(const ConfigReader& config, int head_dim, int max_position_embeddings,
                            const std::string& layer_type, double default_theta, const std::string& type_override) {
  RopeParams p;
  p.head_dim = head_dim;
  p.max_position_embeddings = max_position_embeddings;
  p.theta = config.get_num("rope_theta", default_theta);
  double partial = config.get_num("partial_rotary_factor", 1.0);
  int original_max_top = config.get_int("original_max_position_embeddings", 0);

  const char* key = config.has("rope_parameters") ? "rope_parameters" : "rope_scaling";
  bool have = config.has(key);
  ConfigReader rope = have ? config.child(key) : config;
  if (have && !layer_type.empty()) {
    if (!rope.has(layer_type)) rope.fail("has no entry for layer type '" + layer_type + "'");
    rope = rope.child(layer_type);
  }
  if (have) {
    p.theta = rope.get_num("rope_theta", p.theta);
    partial = rope.get_num("partial_rotary_factor", partial);
    p.type = rope.get_str("rope_type", rope.get_str("type", "default"));
  }
  if (!type_override.empty()) p.type = type_override;
  if (partial <= 0.0 || partial > 1.0) config.fail("partial_rotary_factor must be in (0, 1]");
  p.rotary_dim = int(head_dim * partial);
  if (p.rotary_dim < 2 || p.rotary_dim % 2 != 0)
    config.fail("the rotary dimension head_dim * partial_rotary_factor = " + std::to_string(p.rotary_dim) +
                " must be a positive even number");
  if (p.theta <= 0) config.fail("rope_theta must be > 0");
  const int half = p.rotary_dim / 2;
  // Phi-3 keeps original_max_position_embeddings outside the RoPE parameters, and it wins (transformers).
  p.original_max_position_embeddings =
      original_max_top > 0 ? original_max_top : rope.get_int("original_max_position_embeddings", max_position_embeddings);

  if (p.type == "default") {
    // nothing more
  } else if (p.type == "linear") {
    p.factor = rope.get_num("factor", 1.0);
  } else if (p.type == "llama3") {
    p.factor = rope.get_num("factor", 8.0);
    p.low_freq_factor = rope.get_num("low_freq_factor", 1.0);
    p.high_freq_factor = rope.get_num("high_freq_factor", 4.0);
    if (p.high_freq_factor == p.low_freq_factor) rope.fail("llama3 RoPE needs high_freq_factor != low_freq_factor");
  } else if (p.type == "dynamic") {
    p.factor = rope.get_num("factor", 1.0);
    if (p.rotary_dim <= 2) rope.fail("dynamic RoPE needs a rotary dimension > 2");
  } else if (p.type == "yarn") {
    p.factor = rope.get_num("factor", double(max_position_embeddings) / p.original_max_position_embeddings);
    p.beta_fast = rope.get_num("beta_fast", 32.0);
    p.beta_slow = rope.get_num("beta_slow", 1.0);
    if (p.beta_fast == 0) p.beta_fast = 32.0;
    if (p.beta_slow == 0) p.beta_slow = 1.0;
    p.truncate = rope.get_bool("truncate", true);
    const double mscale = rope.get_num("mscale", 0.0), mscale_all = rope.get_num("mscale_all_dim", 0.0);
    if (rope.has("attention_factor")) p.attention_factor = rope.get_num("attention_factor", 1.0);
    else if (mscale != 0.0 && mscale_all != 0.0)
      p.attention_factor = yarn_mscale(p.factor, mscale) / yarn_mscale(p.factor, mscale_all);
    else p.attention_factor = yarn_mscale(p.factor, 1.0);
  } else if (p.type == "longrope") {
    p.short_factor = rope.get_num_list("short_factor");
    p.long_factor = rope.get_num_list("long_factor");
    if (int(p.short_factor.size()) != half || int(p.long_factor.size()) != half)
      rope.fail("longrope short_factor and long_factor need rotary_dim / 2 = " + std::to_string(half) +
                " entries (have " + std::to_string(p.short_factor.size()) + " and " +
                std::to_string(p.long_factor.size()) + ")");
    p.factor = rope.get_num("factor", double(max_position_embeddings) / p.original_max_position_embeddings);
    if (rope.has("attention_factor")) p.attention_factor = rope.get_num("attention_factor", 1.0);
    else if (p.factor <= 1.0) p.attention_factor = 1.0;
    else p.attention_factor = std::sqrt(1.0 + std::log(p.factor) / std::log(double(p.original_max_position_embeddings)));
  } else {
    rope.fail("rope type '" + p.type + "' is not supported (default, linear, llama3, yarn, dynamic, longrope)");
  }
  if (p.factor <= 0) rope.fail("RoPE factor must be > 0");
  if (p.original_max_position_embeddings <= 0) rope.fail("original_max_position_embeddings must be > 0");
  return p;
}

}  // namespace metal_engine::models
