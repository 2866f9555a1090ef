// What the machine gives the cpu kernels, measured: memory read bandwidth (every thread of our pool streams
// its share of a large buffer) and the f32 FMA peak (every thread runs independent FMAs in registers, at
// whatever clock the cores hold now). The benchmarks state decode speed as a fraction of the bandwidth
// bound and GEMM speed as a fraction of the FMA peak.
#pragma once
#include <cstddef>
#include <vector>

namespace metal_engine::cpu {

// Median GB/s (1e9 bytes/s) of `repeats` passes over a `bytes` buffer with `num_threads` threads.
double measure_read_bandwidth(size_t bytes, int num_threads, int repeats);

// Median GFLOP/s (an FMA is 2 flops) of `repeats` runs of about 20 ms of register-only FMAs on each of
// `num_threads` threads, in `bits`-wide vectors (256 or 512; 0: the widest the GEMM runs here, 512 where
// gemm_wide_vectors() took the panels). Without AVX2 + FMA: scalar code, a lower bound.
double measure_fma_peak(int num_threads, int repeats, int bits = 0);

// The build's cpu GEMM, e.g. "register tiles 8x3 (AVX-512, 512-bit FMA)": the vector width it runs here.
const char* gemm_description();
// The GEMM choices this build has, by vector width: {256, 512} with AVX-512 (512: the packed panels from
// kPanelMinRows rows; gemm_wide_vectors() picks at run time, METAL_ENGINE_CPU_GEMM_BITS forces it), else {256}
// (the tiles; NEON and plain C++ count as 256).
std::vector<int> gemm_vector_bits();

// Whether the matmuls of many rows run on AMX tiles (gemm_amx.h: quantized W from 6 rows, f16 / bf16 W from 48):
// METAL_ENGINE_CPU_AMX=0
// never, =1 always (a std::invalid_argument naming the reason where the build or the machine has no AMX), unset
// where the build has the AMX path and the kernel grants the tile state (arch_prctl). Decided once per process.
bool amx_tiles();
// The choices this build and machine have: {false, true} where AMX runs, else {false}.
std::vector<bool> amx_choices();

// Whether the quantized matmuls of 6+ rows run on the int16 panels of gemm_quant_panels.h (AVX-512 VNNI builds)
// where AMX does not: METAL_ENGINE_CPU_QUANT_PANELS=0 never (W dequantized for the float GEMM), =1 or unset where
// the build has them (1 elsewhere: a std::invalid_argument naming why). Decided once per process.
bool quant_panels();
// {false, true} where the build has them, else {false}.
std::vector<bool> quant_panels_choices();

}  // namespace metal_engine::cpu
