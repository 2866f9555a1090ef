#include <gtest/gtest.h>

#include "metal_engine/config.h"

using namespace metal_engine;

static const char* kSmolLM2 = R"({
  "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "hidden_size": 576,
  "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
  "num_key_value_heads": 3, "vocab_size": 49152, "rms_norm_eps": 1e-05, "rope_theta": 100000.0,
  "tie_word_embeddings": true, "max_position_embeddings": 8192, "torch_dtype": "bfloat16"})";

TEST(ModelConfig, ParsesALlamaConfig) {
  ModelConfig c = ModelConfig::from_json(kSmolLM2, "config.json");
  EXPECT_EQ(c.architecture, "LlamaForCausalLM");
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.num_kv_heads, 3);
  EXPECT_FLOAT_EQ(c.rope_theta, 1e5f);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.checkpoint_dtype, DType::BF16);
  EXPECT_EQ(c.sliding_window, 0);
}

TEST(ModelConfig, TransformersFiveRopeParametersAndMistralWindow) {
  ModelConfig c = ModelConfig::from_json(R"({"model_type": "mistral", "hidden_size": 64, "intermediate_size": 88,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
    "sliding_window": 5, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
    "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})",
                                         "config.json");
  EXPECT_EQ(c.architecture, "MistralForCausalLM");
  EXPECT_EQ(c.rope_type, "llama3");
  EXPECT_FLOAT_EQ(c.rope_theta, 5e5f);
  EXPECT_EQ(c.sliding_window, 5);
  EXPECT_TRUE(c.layer_uses_sliding_window[0] && c.layer_uses_sliding_window[1]);
}

TEST(ModelConfig, ClearErrors) {
  auto msg = [](const char* text) {
    try {
      ModelConfig::from_json(text, "cfg.json");
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(msg(R"({"architectures": ["GPT2LMHeadModel"]})").find("unsupported architecture 'GPT2LMHeadModel'"),
            std::string::npos);
  EXPECT_NE(msg(R"({"model_type": "llama", "hidden_size": 64})").find("missing required field"), std::string::npos);
  EXPECT_NE(msg(R"({"model_type": "llama", )").find("cfg.json: invalid JSON"), std::string::npos);
  EXPECT_NE(msg(R"({"model_type": "llama", "hidden_size": 64, "intermediate_size": 8, "num_hidden_layers": 1,
    "num_attention_heads": 4, "num_key_value_heads": 3, "vocab_size": 10})").find("must be a multiple"),
            std::string::npos);
}
