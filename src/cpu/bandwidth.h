// Memory read bandwidth as the cpu kernels see it: every thread of our pool streams its share of a
// large buffer. Used by the benchmarks to state decode speed as a fraction of the bandwidth bound.
#pragma once
#include <cstddef>

namespace metal_engine::cpu {

// Median GB/s (1e9 bytes/s) of `repeats` passes over a `bytes` buffer with `num_threads` threads.
double measure_read_bandwidth(size_t bytes, int num_threads, int repeats);

}  // namespace metal_engine::cpu
