// greedy_generate: loads a Hugging Face checkpoint, prefills the given prompt token ids in one step,
// then decodes greedily one token per step, and prints the generated token ids.
//
//   greedy_generate <checkpoint_dir> <num_new_tokens> <token_id> [<token_id> ...]
//   (env METAL_ENGINE_DTYPE: float32 (default), float16 or bfloat16)
#include <metal_engine/engine.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

using namespace metal_engine;

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s <checkpoint_dir> <num_new_tokens> <token_id> [<token_id> ...]\n", argv[0]);
    return 2;
  }
  try {
    EngineConfig config;
    const char* dtype = std::getenv("METAL_ENGINE_DTYPE");  // weights and KV cache; default float32
    config.dtype = dtype ? dtype : "float32";
    config.kv_cache_memory = size_t(64) << 20;
    auto engine = Engine::from_checkpoint(argv[1], config);
    const ModelConfig& m = engine->model_config();
    const int new_tokens = std::atoi(argv[2]);
    std::vector<int32_t> tokens;
    for (int i = 3; i < argc; ++i) tokens.push_back(std::atoi(argv[i]));

    // One sequence; its blocks are 0, 1, 2, ... in a block table wide enough for the whole run.
    const int bs = engine->kv_cache().block_size();
    const int width = (int(tokens.size()) + new_tokens + bs - 1) / bs;
    if (width > engine->kv_cache().num_blocks()) {
      std::fprintf(stderr, "the KV cache holds %d blocks; this run needs %d\n", engine->kv_cache().num_blocks(), width);
      return 1;
    }
    std::vector<int32_t> block_table(static_cast<size_t>(width));
    for (int b = 0; b < width; ++b) block_table[size_t(b)] = b;

    std::printf("%s: %d layers, hidden %d, vocab %d\n", m.architecture.c_str(), m.num_layers, m.hidden_size,
                m.vocab_size);
    int cached = 0;
    for (int step = 0; step < new_tokens; ++step) {
      StepInput in;
      const int n = int(tokens.size()) - cached;  // the prompt first, then one token per step
      for (int i = 0; i < n; ++i) {
        const int p = cached + i;
        in.token_ids.push_back(tokens[size_t(p)]);
        in.positions.push_back(p);
        in.slot_mapping.push_back(int64_t(block_table[size_t(p / bs)]) * bs + p % bs);
      }
      in.query_start_loc = {0, n};
      in.seq_lens = {cached + n};
      in.block_tables = block_table;
      in.block_table_width = width;
      in.logits_indices = {n - 1};
      std::vector<float> logits = engine->step(in);
      const int next = int(std::max_element(logits.begin(), logits.end()) - logits.begin());
      cached += n;
      tokens.push_back(next);
      std::printf("%d%s", next, step + 1 < new_tokens ? " " : "\n");
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
