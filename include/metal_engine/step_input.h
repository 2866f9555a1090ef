// StepInput: everything one engine step needs, stated explicitly (vLLM v1's flattened batch). A step
// mixes prefill chunks and decode tokens of many sequences; the engine infers nothing from shapes.
#pragma once
#include <cstdint>
#include <vector>

namespace metal_engine {

struct StepInput {
  std::vector<int32_t> token_ids;        // [num_tokens]
  std::vector<int32_t> positions;        // [num_tokens]   RoPE position of each token
  std::vector<int32_t> query_start_loc;  // [num_seqs + 1] tokens of sequence s: [qsl[s], qsl[s+1])
  std::vector<int32_t> seq_lens;         // [num_seqs]     context length after this step (cached + new)
  std::vector<int32_t> block_tables;     // [num_seqs, block_table_width] physical block ids, row-major
  int32_t block_table_width = 0;
  std::vector<int64_t> slot_mapping;     // [num_tokens]   KV slot = block_id * block_size + offset; < 0 skips
  std::vector<int32_t> logits_indices;   // [num_logit_rows] token rows whose logits the step returns
  // [num_tokens] or empty. Row t with prev_token_rows[t] = r >= 0 takes as its token the greedy token of logits row r
  // of the step submitted just before this one (which must be a greedy Engine::submit), on the device: token_ids[t]
  // is then a placeholder (any id in the vocabulary). -1: token_ids[t] as given. Two steps in flight (vLLM's async
  // scheduling) decode this way: the host never waits for a token to pass it to the next step.
  std::vector<int32_t> prev_token_rows;

  int num_tokens() const { return int(token_ids.size()); }
  int num_seqs() const { return query_start_loc.empty() ? 0 : int(query_start_loc.size()) - 1; }
};

}  // namespace metal_engine
