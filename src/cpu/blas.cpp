#include "blas.h"

#if defined(ME_BLAS_ACCELERATE)
#define ACCELERATE_NEW_LAPACK 1
#include <Accelerate/Accelerate.h>
#elif defined(ME_BLAS_SCIPY_OPENBLAS)
#include <cblas.h>
#endif

#include <stdexcept>

namespace metal_engine::cpu {

#if defined(ME_BLAS_ACCELERATE)

bool blas_available() { return true; }
bool blas_preferred_for_gemm() { return true; }
const char* blas_name() { return "Accelerate"; }
void blas_sgemm_xwt(int m, int n, int k, const float* x, int ldx, const float* w, int ldw, float* y, int ldy) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, x, ldx, w, ldw, 0.0f, y, ldy);
}
void blas_sgemm_xw(int m, int n, int k, const float* x, int ldx, const float* w, int ldw, float* y, int ldy) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1.0f, x, ldx, w, ldw, 0.0f, y, ldy);
}

#elif defined(ME_BLAS_SCIPY_OPENBLAS)

namespace {
struct SingleThreaded {
  SingleThreaded() { scipy_openblas_set_num_threads(1); }  // our pool provides the parallelism
};
}  // namespace

bool blas_available() { return true; }
bool blas_preferred_for_gemm() { return false; }
const char* blas_name() { return "OpenBLAS (scipy-openblas32)"; }
void blas_sgemm_xwt(int m, int n, int k, const float* x, int ldx, const float* w, int ldw, float* y, int ldy) {
  static SingleThreaded once;
  scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, x, ldx, w, ldw, 0.0f, y, ldy);
}
void blas_sgemm_xw(int m, int n, int k, const float* x, int ldx, const float* w, int ldw, float* y, int ldy) {
  static SingleThreaded once;
  scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1.0f, x, ldx, w, ldw, 0.0f, y, ldy);
}

#else

bool blas_available() { return false; }
bool blas_preferred_for_gemm() { return false; }
const char* blas_name() { return "none"; }
void blas_sgemm_xwt(int, int, int, const float*, int, const float*, int, float*, int) {
  throw std::logic_error("blas_sgemm_xwt called in a build without a BLAS");
}
void blas_sgemm_xw(int, int, int, const float*, int, const float*, int, float*, int) {
  throw std::logic_error("blas_sgemm_xw called in a build without a BLAS");
}

#endif

}  // namespace metal_engine::cpu
