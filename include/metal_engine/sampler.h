// Sampling the next token of each row of a step's logits (the generation layer's hot loop, in C++ so a batch
// costs well under a millisecond): top-k, top-p and min-p over the tempered logits, then an inverse-CDF draw
// in token order. The same definitions as vLLM: top-p keeps a token while the probability mass of the tokens
// strictly more likely than it is below top_p (the most likely always kept; ties in token order); min-p keeps
// the tokens at least min_p times as likely as the most likely.
#pragma once
#include <cstdint>

namespace metal_engine {

// logits f32 [rows, vocab] (processed: -inf for banned tokens); per row its temperature (> 0), top_k (0: off),
// top_p (1: off), min_p (0: off) and u, a uniform draw in [0, 1). Writes tokens[rows]. A row with no finite
// logit takes token 0. O(vocab) a row: top-p sorts only the tokens whose probability shares a 16-bit prefix
// with the one where the kept mass crosses top_p.
void sample_rows(const float* logits, int64_t rows, int64_t vocab, const float* temperature, const int32_t* top_k,
                 const float* top_p, const float* min_p, const double* u, int64_t* tokens);

}  // namespace metal_engine
