// feed_tokens: dst[t] = src[rows[t]] where 0 <= rows[t] < num_src, else dst[t] as it was, a thread per token: the
// next step's token ids from this step's greedy tokens, on the device (two command buffers in flight).
#include <metal_stdlib>
#include "op_args.h"
using namespace metal;
using namespace metal_engine;

kernel void feed_tokens(constant FeedTokensArgs& args [[buffer(0)]],
                        device const int* src [[buffer(1)]],   // [num_src]
                        device const int* rows [[buffer(2)]],  // [num_tokens]
                        device int* dst [[buffer(3)]],         // [num_tokens]
                        uint t [[thread_position_in_grid]]) {
  if (int(t) >= args.num_tokens) return;
  const int r = rows[t];
  if (r >= 0 && r < args.num_src) dst[t] = src[r];
}
