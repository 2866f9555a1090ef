// f32 GEMM through a BLAS, where the build found one: Accelerate on macOS, OpenBLAS from the PyPI
// package scipy-openblas32 elsewhere. The BLAS runs single-threaded inside each of our pool's threads,
// so our thread pool alone owns the cores.
#pragma once

namespace metal_engine::cpu {

bool blas_available();
// Whether prefill's matmul (33+ rows) should go through the BLAS rather than our register tiles: Accelerate
// on Apple Silicon runs sgemm on the AMX units, beyond what NEON FMAs reach (not measured here: no Mac);
// OpenBLAS on x86-64 measured 1.1-1.4x slower than the tiles.
bool blas_preferred_for_gemm();
const char* blas_name();  // "Accelerate", "OpenBLAS (scipy-openblas32)" or "none"

// y[m, n] = x[m, k] @ w[n, k]^T, row-major with leading dimensions ldx, ldw, ldy. Requires blas_available().
void blas_sgemm_xwt(int m, int n, int k, const float* x, int ldx, const float* w, int ldw, float* y, int ldy);
// y[m, n] = x[m, k] @ w[k, n], the same conventions.
void blas_sgemm_xw(int m, int n, int k, const float* x, int ldx, const float* w, int ldw, float* y, int ldy);

}  // namespace metal_engine::cpu
