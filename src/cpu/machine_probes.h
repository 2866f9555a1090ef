// What the machine gives the cpu kernels, measured: memory read bandwidth (every thread of our pool streams
// its share of a large buffer) and the f32 FMA peak (every thread runs independent FMAs in registers, at
// whatever clock the cores hold now). The benchmarks state decode speed as a fraction of the bandwidth
// bound and GEMM speed as a fraction of the FMA peak.
#pragma once
#include <cstddef>

namespace metal_engine::cpu {

// Median GB/s (1e9 bytes/s) of `repeats` passes over a `bytes` buffer with `num_threads` threads.
double measure_read_bandwidth(size_t bytes, int num_threads, int repeats);

// Median GFLOP/s (an FMA is 2 flops) of `repeats` runs of about 20 ms of register-only 256-bit FMAs on each of
// `num_threads` threads. Without AVX2 + FMA: scalar code, a lower bound.
double measure_fma_peak(int num_threads, int repeats);

// The build's cpu GEMM, e.g. "register tiles 8x3 (AVX-512VL)".
const char* gemm_description();

}  // namespace metal_engine::cpu
