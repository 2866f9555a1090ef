#include "machine_probes.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__linux__) && (defined(__x86_64__) || defined(__i386__))
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "gemm_amx.h"
#include "gemm_panels.h"
#include "gemm_quant_panels.h"
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

#if ME_AVX2
namespace {
// 12 independent chains of `iters` f32 FMAs in 256- or 512-bit vectors (enough to keep both FMA pipes busy);
// returns a lane of their sum, which the caller keeps observable.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"  // __m512 / __m256 as template arguments: their attributes
template <bool kWide>                                  // do not matter to conditional_t
float fma_chains(int64_t iters, int seed) {
#if !ME_GEMM512
  static_assert(!kWide, "512-bit FMAs need an AVX-512 build");
#endif
  using V = std::conditional_t<kWide, __m512, __m256>;
  V acc[12], a, b;
#if ME_GEMM512
  if constexpr (kWide) {
    for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_ps(float(i + seed));
    a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
    for (int64_t it = 0; it < iters; ++it)
      for (int i = 0; i < 12; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  } else
#endif
  {
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(float(i + seed));
    a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
    for (int64_t it = 0; it < iters; ++it)
      for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  }
  float sink = 0.f;
  for (int i = 0; i < 12; ++i) sink += reinterpret_cast<const float*>(&acc[i])[0];
  return sink;
}
#pragma GCC diagnostic pop
}  // namespace
#endif

double measure_fma_peak(int num_threads, int repeats, int bits) {
  ThreadPool pool(num_threads);
  constexpr int64_t kIters = 1 << 20;  // x 12 FMAs x 8 lanes x 2 flops per thread: ~20 ms at 3 GHz
  std::vector<float> sink(size_t(pool.size()) * 8, 0.f);
  std::vector<double> rates;
  if (bits != 0 && bits != 256 && bits != 512) throw std::invalid_argument("measure_fma_peak: bits is 0, 256 or 512");
#if ME_GEMM512
  const bool wide = bits == 512 || (bits == 0 && gemm_wide_vectors());
#else
  if (bits == 512) throw std::invalid_argument("measure_fma_peak: this build has no 512-bit FMA path");
  const bool wide = false;
#endif
  for (int r = 0; r < repeats + 1; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    pool.run([&](int tid) {
#if ME_GEMM512
      sink[size_t(tid) * 8] = wide ? fma_chains<true>(kIters, tid) : fma_chains<false>(kIters, tid);
#elif ME_AVX2
      sink[size_t(tid) * 8] = fma_chains<false>(kIters, tid);
#else
      float acc[12];
      for (int i = 0; i < 12; ++i) acc[i] = float(i + tid);
      for (int64_t it = 0; it < kIters; ++it)
        for (int i = 0; i < 12; ++i) acc[i] = acc[i] * 0.999999f + 1e-7f;
      float s = 0.f;
      for (int i = 0; i < 12; ++i) s += acc[i];
      sink[size_t(tid) * 8] = s;
#endif
    });
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
#if ME_AVX2
    const double flops = double(kIters) * 12 * (wide ? 16 : 8) * 2 * pool.size();
#else
    const double flops = double(kIters) * 12 * 2 * pool.size();
    (void)wide;
#endif
    if (r > 0) rates.push_back(flops / sec / 1e9);
  }
  std::sort(rates.begin(), rates.end());
  return rates[rates.size() / 2] + (sink[0] == -1.f ? 1.0 : 0.0);  // keep the sums observable
}

#if ME_GEMM512
namespace {
// One thread's f32 FMA rate (GFLOP/s) in 256- or 512-bit vectors, ~1 ms at the default.
template <bool kWide>
double fma_rate(int64_t iters = 1 << 18) {
  auto t0 = std::chrono::steady_clock::now();
  const float sink = fma_chains<kWide>(iters, 0);
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return double(iters) * 12 * (kWide ? 16 : 8) * 2 / sec / 1e9 + (sink == -1.f ? 1.0 : 0.0);
}
}  // namespace

bool gemm_wide_vectors() {
  static const bool wide = [] {
    if (const char* env = std::getenv("METAL_ENGINE_CPU_GEMM_BITS"); env && *env) {
      const std::string v = env;
      if (v == "512") return true;
      if (v == "256") return false;
      throw std::invalid_argument("METAL_ENGINE_CPU_GEMM_BITS='" + v + "': 256 (the cpu GEMM's dot-product tiles "
                                  "only) or 512 (its 512-bit panels from " + std::to_string(kPanelMinRows) +
                                  " rows); unset: measured at start-up");
    }
    // Best of four, alternated (a moment's load on the core hits both alike), after ~3 ms of 512-bit FMAs: a
    // core runs them at reduced throughput until it has powered their upper lanes up (measured here: the choice
    // went either way with 0.3 ms runs and no warm-up).
    double r256 = 0, r512 = 0;
    fma_rate<true>(1 << 20);
    for (int i = 0; i < 4; ++i) {
      r512 = std::max(r512, fma_rate<true>());
      r256 = std::max(r256, fma_rate<false>());
    }
    return r512 >= 1.4 * r256;  // 1.8x on Intel's cores with two 512-bit FMA units, ~1.0x on Zen 4
  }();
  return wide;
}
#else
bool gemm_wide_vectors() {
  if (const char* env = std::getenv("METAL_ENGINE_CPU_GEMM_BITS"); env && *env && std::string(env) != "256")
    throw std::invalid_argument(std::string("METAL_ENGINE_CPU_GEMM_BITS='") + env + "': this build's cpu GEMM has " +
                                "no 512-bit panels (it was built without AVX-512); 256 or unset");
  return false;
}
#endif

#if ME_AMX
namespace {
// Whether the kernel lets this process use AMX's tile data (Linux asks for it per process since 5.16).
bool amx_granted() {
  if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-int8") || !__builtin_cpu_supports("amx-bf16"))
    return false;
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
}
}  // namespace
#endif

bool amx_tiles() {
  static const bool on = [] {
    const char* env = std::getenv("METAL_ENGINE_CPU_AMX");
    const std::string v = env ? env : "";
    if (v == "0") return false;
    if (!v.empty() && v != "1")
      throw std::invalid_argument("METAL_ENGINE_CPU_AMX='" + v + "': 0 (the matmuls of many rows, quantized "
                                  "from " + std::to_string(kAmxMinRows) + ", f16 / bf16 from " +
                                  std::to_string(kAmxBf16MinRows) + ", on the vector units) or 1 (on AMX tiles); "
                                  "unset: AMX where the machine has it");
#if !ME_AMX
    if (v == "1")
      throw std::invalid_argument("METAL_ENGINE_CPU_AMX=1: this build of the cpu kernels has no AMX path (built "
                                  "without AMX-INT8 / AMX-BF16 and AVX-512); 0 or unset");
    return false;
#else
    const bool granted = amx_granted();
    if (v == "1" && !granted)
      throw std::invalid_argument("METAL_ENGINE_CPU_AMX=1: this machine's CPU or kernel does not grant AMX's tile "
                                  "state (arch_prctl ARCH_REQ_XCOMP_PERM refused); 0 or unset");
    return granted;
#endif
  }();
  return on;
}

std::vector<bool> amx_choices() {
#if ME_AMX
  static const bool granted = amx_granted();
  if (granted) return {false, true};
#endif
  return {false};
}

bool quant_panels() {
  static const bool on = [] {
    const char* env = std::getenv("METAL_ENGINE_CPU_QUANT_PANELS");
    const std::string v = env ? env : "";
    if (!v.empty() && v != "0" && v != "1")
      throw std::invalid_argument("METAL_ENGINE_CPU_QUANT_PANELS='" + v + "': 0 (the quantized matmuls of " +
                                  std::to_string(kAmxMinRows) + "+ rows dequantize W for the float GEMM) or 1 (they "
                                  "run on int16 panels, with AVX-512 VNNI); unset: the panels where built");
#if ME_QUANT_PANELS
    return v != "0";
#else
    if (v == "1")
      throw std::invalid_argument("METAL_ENGINE_CPU_QUANT_PANELS=1: this build of the cpu kernels has no int16 panels "
                                  "(built without AVX-512 VNNI); 0 or unset");
    return false;
#endif
  }();
  return on;
}

std::vector<bool> quant_panels_choices() {
#if ME_QUANT_PANELS
  return {false, true};
#else
  return {false};
#endif
}

std::vector<int> gemm_vector_bits() {
#if ME_GEMM512
  return {256, 512};
#else
  return {256};
#endif
}

#if ME_QUANT_PANELS
static_assert(qpanel::kMR == 4 && qpanel::kUnit == 24);
constexpr const char* kQuantPanelNote = "; quantized weights from 6 rows: int16 panels 4x24 (VNNI dpwssd), W packed per call";
#else
constexpr const char* kQuantPanelNote = "";
#endif

const char* gemm_description() {
#if ME_GEMM512
  static_assert(kTileRows == 8 && kTileW == 3);
  static const std::string d =
      std::string(gemm_wide_vectors() ? "register tiles 8x3 (AVX-512 registers, 256-bit FMA); from 256 rows packed "
                                        "panels 14x32 (512-bit FMA)"
                                      : "register tiles 8x3 (AVX-512 registers, 256-bit FMA)") +
      (amx_tiles() ? "; AMX tiles for f16 / bf16 weights from " + std::to_string(kAmxBf16MinRows) +
                         " rows (bf16 x 2 split) and quantized ones from " + std::to_string(kAmxMinRows) + " (int8 x 2)"
                   : std::string(quant_panels() ? kQuantPanelNote : ""));
  return d.c_str();
#elif ME_AVX2 && defined(__AVX512VL__)
  static_assert(kTileRows == 8 && kTileW == 3);
  static const std::string d =
      std::string("register tiles 8x3 (AVX-512VL registers, 256-bit FMA)") + (quant_panels() ? kQuantPanelNote : "");
  return d.c_str();
#elif ME_AVX2
  return "register tiles 6x2 (AVX2 + FMA + F16C)";
#elif ME_NEON
  return "register tiles 8x3 (NEON)";
#else
  return "dot-product tiles (plain C++)";
#endif
}

}  // namespace metal_engine::cpu
