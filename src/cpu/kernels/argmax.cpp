// argmax: out[r] = the first index of the largest logit of row r (NaN-free input). Each row is cut into one
// chunk per thread (batch-1 greedy decoding has a single 49152-logit row); a chunk's maximum is found 8 lanes
// at a time, then its first position; the chunks' (max, index) pairs merge left to right, so ties go to the
// lowest index as np.argmax does.
#include <algorithm>
#include <vector>

#include "../cpu_kernels.h"
#include "../simd.h"

namespace metal_engine::cpu {

namespace {

struct Best {
  float value;
  int index;
};

// The largest value of x[begin, end) and its first position.
Best chunk_argmax(const float* x, int begin, int end) {
  float m = x[begin];
  int i = begin;
#if defined(__AVX2__)
  if (end - begin >= 16) {
    __m256 vm = _mm256_loadu_ps(x + begin);
    for (i = begin + 8; i + 8 <= end; i += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(x + i));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vm);
    m = *std::max_element(lanes, lanes + 8);
  } else {
    i = begin + 1;
  }
#else
  i = begin + 1;
#endif
  for (; i < end; ++i) m = std::max(m, x[i]);
  for (i = begin; i < end; ++i)
    if (x[i] == m) break;
  return Best{m, i};
}

void argmax(const ArgmaxArgs& a, void* const* b, ThreadPool& pool) {
  const float* logits = static_cast<const float*>(b[0]);  // [rows, vocab]
  int32_t* out = static_cast<int32_t*>(b[1]);            // [rows]
  if (a.rows <= 0 || a.vocab <= 0) return;
  const int chunks = std::max(1, std::min(pool.size(), a.vocab / 4096));
  std::vector<Best> best(size_t(a.rows) * chunks);
  pool.parallel_for_dynamic(int64_t(a.rows) * chunks, [&](int64_t job, int) {
    const int r = int(job / chunks), c = int(job % chunks);
    const int begin = int(int64_t(a.vocab) * c / chunks), end = int(int64_t(a.vocab) * (c + 1) / chunks);
    best[size_t(job)] = chunk_argmax(logits + int64_t(r) * a.vocab, begin, end);
  });
  for (int r = 0; r < a.rows; ++r) {
    Best m = best[size_t(r) * chunks];
    for (int c = 1; c < chunks; ++c)
      if (best[size_t(r) * chunks + c].value > m.value) m = best[size_t(r) * chunks + c];
    out[r] = m.index;
  }
}

}  // namespace

void add_argmax_kernels(std::vector<KernelDef>& table) {
  table.push_back(make_kernel<ArgmaxArgs>("argmax", 2, argmax));
}

}  // namespace metal_engine::cpu
