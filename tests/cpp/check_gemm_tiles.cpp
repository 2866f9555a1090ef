// The cpu GEMM's register tiles (src/cpu/gemm_tiles.h), and its 512-bit packed panels (gemm_panels.h) where
// the build has them, against a double-precision reference, for every tile / block remainder (rows of x, rows
// of W), short and odd k, strided operands and f32 / f16 / bf16 W, with guard values around each output row.
// A plain program (no GoogleTest) so that tests/check_arm64.sh can cross-build it and run the NEON tiles under
// qemu; ctest runs the native build (AVX-512VL or AVX2 tiles).
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cpu/gemm_panels.h"
#include "cpu/gemm_tiles.h"
#include "cpu/machine_probes.h"

using namespace metal_engine::cpu;

namespace {

template <class W>
W to_w(float v);
template <>
float to_w<float>(float v) { return v; }
template <>
f16 to_w<f16>(float v) { return f16{metal_engine::float_to_half(v)}; }
template <>
bf16 to_w<bf16>(float v) { return bf16{metal_engine::float_to_bf16(v)}; }

template <class W, bool kPanels = false>
int check(const char* wname, int M, int N, int K, int pad, std::mt19937& rng) {
  std::normal_distribution<float> nd;
  const int64_t ldx = K + pad, ldw = K + pad, ldy = N + 3;  // strided operands; 3 guard floats per y row
  std::vector<float> x(size_t(M) * ldx);
  std::vector<W> w(size_t(N) * ldw);
  std::vector<double> wd(w.size());
  for (auto& v : x) v = nd(rng);
  for (size_t i = 0; i < w.size(); ++i) {
    w[i] = to_w<W>(nd(rng));
    wd[i] = to_float(w[i]);
  }
  constexpr float kGuard = 12345.f;
  std::vector<float> y(size_t(M) * ldy, kGuard);
  // two thread-like slices of W's rows, as matmul hands them out (whole panels for the panels)
#if ME_GEMM512
  if constexpr (kPanels) {
    const int64_t split = N / 2 / panels::kNR * panels::kNR;
    gemm_xwt_panels(x.data(), M, w.data(), y.data(), K, {ldx, ldw, ldy}, 0, split);
    gemm_xwt_panels(x.data(), M, w.data(), y.data(), K, {ldx, ldw, ldy}, split, N);
  } else
#endif
  {
    const int64_t split = N / 2;
    gemm_xwt_tiles(x.data(), M, w.data(), y.data(), K, {ldx, ldw, ldy}, 0, split);
    gemm_xwt_tiles(x.data(), M, w.data(), y.data(), K, {ldx, ldw, ldy}, split, N);
  }
  int bad = 0;
  for (int r = 0; r < M; ++r) {
    for (int j = 0; j < N; ++j) {
      double ref = 0;
      for (int k = 0; k < K; ++k) ref += double(x[size_t(r) * ldx + k]) * wd[size_t(j) * ldw + k];
      const double got = y[size_t(r) * ldy + j];
      if (!(std::fabs(got - ref) <= 1e-4 * std::sqrt(double(K)) + 1e-5 * std::fabs(ref))) {
        if (bad++ < 3)
          std::printf("  %s M=%d N=%d K=%d: y[%d, %d] = %g, expected %g\n", wname, M, N, K, r, j, got, ref);
      }
    }
    for (int j = N; j < ldy; ++j)
      if (y[size_t(r) * ldy + j] != kGuard && bad++ < 3)
        std::printf("  %s M=%d N=%d K=%d: wrote past row %d's end (column %d)\n", wname, M, N, K, r, j);
  }
  return bad ? 1 : 0;
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  int cases = 0, failed = 0;
  for (int M : {1, 2, 3, 5, 6, 7, 8, 9, 13, 16, 17, 31, 32})
    for (int N : {1, 2, 3, 4, 5, 7, 50})
      for (int K : {1, 3, 8, 9, 31, 64, 100})
        for (int pad : {0, 5}) {
          failed += check<float>("f32", M, N, K, pad, rng);
          failed += check<f16>("f16", M, N, K, pad, rng);
          failed += check<bf16>("bf16", M, N, K, pad, rng);
          cases += 3;
        }
  std::printf("gemm tiles (%s): %d of %d cases passed\n", gemm_description(), cases - failed, cases);
#if ME_GEMM512
  // the 512-bit panels: every row remainder of their 14-row blocks, partial panels, odd k (any k: no vector
  // runs along it), strided operands
  int pcases = 0, pfailed = 0;
  for (int M : {1, 2, 5, 13, 14, 15, 27, 28, 29, 64, 65})
    for (int N : {1, 7, 31, 32, 33, 64, 70, 100})
      for (int K : {1, 3, 16, 17, 64, 100})
        for (int pad : {0, 5}) {
          pfailed += check<float, true>("f32 panels", M, N, K, pad, rng);
          pfailed += check<f16, true>("f16 panels", M, N, K, pad, rng);
          pfailed += check<bf16, true>("bf16 panels", M, N, K, pad, rng);
          pcases += 3;
        }
  std::printf("gemm panels (512-bit): %d of %d cases passed\n", pcases - pfailed, pcases);
  failed += pfailed;
#endif
  return failed ? 1 : 0;
}
