// feed_tokens: dst[t] = src[rows[t]] where 0 <= rows[t] < num_src, else dst[t] as it was: the next step's token
// ids from this step's greedy tokens without the host reading them in between.
#include "../cpu_kernels.h"

namespace metal_engine::cpu {

static void feed_tokens(const FeedTokensArgs& a, void* const* b, ThreadPool&) {
  const int32_t* src = static_cast<const int32_t*>(b[0]);   // [num_src]
  const int32_t* rows = static_cast<const int32_t*>(b[1]);  // [num_tokens]
  int32_t* dst = static_cast<int32_t*>(b[2]);               // [num_tokens]
  for (int t = 0; t < a.num_tokens; ++t)
    if (rows[t] >= 0 && rows[t] < a.num_src) dst[t] = src[rows[t]];
}

void add_feed_tokens_kernels(std::vector<KernelDef>& table) {
  table.push_back(make_kernel<FeedTokensArgs>("feed_tokens", 3, feed_tokens));
}

}  // namespace metal_engine::cpu
