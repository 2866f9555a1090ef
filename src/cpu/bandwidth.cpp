#include "bandwidth.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <vector>

#include "simd.h"
#include "thread_pool.h"

namespace metal_engine::cpu {

double measure_read_bandwidth(size_t bytes, int num_threads, int repeats) {
  const size_t n = bytes / sizeof(float) / 64 * 64;
  std::vector<float> data(n, 1.0f);
  ThreadPool pool(num_threads);
  std::vector<double> sums(size_t(pool.size()), 0.0), rates;
  for (int r = 0; r < repeats + 1; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    pool.run([&](int tid) {
      const size_t begin = n * size_t(tid) / size_t(pool.size()) / 64 * 64;
      const size_t end = n * size_t(tid + 1) / size_t(pool.size()) / 64 * 64;
      float s = 0.f;
#if ME_AVX2
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (size_t i = begin; i < end; i += 32) {
        a0 = _mm256_add_ps(a0, _mm256_loadu_ps(&data[i]));
        a1 = _mm256_add_ps(a1, _mm256_loadu_ps(&data[i + 8]));
        a2 = _mm256_add_ps(a2, _mm256_loadu_ps(&data[i + 16]));
        a3 = _mm256_add_ps(a3, _mm256_loadu_ps(&data[i + 24]));
      }
      s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#else
      for (size_t i = begin; i < end; ++i) s += data[i];
#endif
      sums[size_t(tid)] += s;
    });
    auto t1 = std::chrono::steady_clock::now();
    if (r > 0) rates.push_back(double(n * sizeof(float)) / std::chrono::duration<double>(t1 - t0).count() / 1e9);
  }
  std::sort(rates.begin(), rates.end());
  return rates[rates.size() / 2] + (sums[0] == -1.0 ? 1.0 : 0.0);  // keep the sums observable
}

}  // namespace metal_engine::cpu
