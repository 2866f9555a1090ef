// matmul: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), W [n, k] in f32 / f16 / bf16, x and y f32 or (the
// _act_ variants) in the weights' 16-bit type, f32 accumulation.
// Two kernels; the host picks by the number of rows (src/metal/metal_kernels.cpp, plan_matmul):
//  - matmul_gemv_<wdt> (m <= 4, decode): 4 simdgroups per threadgroup, each taking 4 rows of W against one
//    row of x; lanes stride over k four elements at a time (vector loads), then simd_sum.
//  - matmul_gemm_<wdt> (prefill, batched decode): 32x32 output tiles, K in steps of 16 staged (zero-padded,
//    widened to f32) in threadgroup memory; 4 simdgroups each accumulate a 16x16 block as 2x2
//    simdgroup_float8x8 tiles.
#include <metal_stdlib>
#include <metal_simdgroup_matrix>
#include "op_args.h"
using namespace metal;
using namespace metal_engine;

constant int kGemvRows = 4;         // rows of W per simdgroup
constant int kGemvSimdgroups = 4;   // simdgroups per threadgroup

template <typename W, typename W4, typename A, typename A4, typename Y>
kernel void matmul_gemv(constant MatmulArgs& args [[buffer(0)]],
                        device const A* x [[buffer(1)]],       // [m, k]
                        device const W* w [[buffer(2)]],       // [n, k]
                        device const W* bias [[buffer(3)]],    // [n] (has_bias)
                        device Y* y [[buffer(4)]],             // [m, n]
                        uint3 tg [[threadgroup_position_in_grid]],
                        uint lane [[thread_index_in_simdgroup]],
                        uint sg [[simdgroup_index_in_threadgroup]]) {
  const int K = args.k;
  const int row0 = (int(tg.x) * kGemvSimdgroups + int(sg)) * kGemvRows;
  device const A* xr = x + long(tg.y) * K;
  for (int r = 0; r < kGemvRows; ++r) {
    const int n = row0 + r;  // uniform across the simdgroup
    float acc = 0.0f;
    if (n < args.n) {
      device const W* wr = w + long(n) * K;
      if ((K & 3) == 0) {
        for (int k = int(lane) * 4; k < K; k += 32 * 4)
          acc += dot(float4(*(device const A4*)(xr + k)), float4(*(device const W4*)(wr + k)));
      } else {
        for (int k = int(lane); k < K; k += 32) acc += float(xr[k]) * float(wr[k]);
      }
    }
    acc = simd_sum(acc);
    if (lane == 0 && n < args.n) y[long(tg.y) * args.y_stride + n] = Y(acc + (args.has_bias ? float(bias[n]) : 0.0f));
  }
}

template <typename W, typename A, typename Y>
kernel void matmul_gemm(constant MatmulArgs& args [[buffer(0)]],
                        device const A* x [[buffer(1)]],       // [m, k]
                        device const W* w [[buffer(2)]],       // [n, k]
                        device const W* bias [[buffer(3)]],    // [n] (has_bias)
                        device Y* y [[buffer(4)]],             // [m, n]
                        uint3 tg [[threadgroup_position_in_grid]],
                        uint tid [[thread_index_in_threadgroup]],
                        uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float xs[32 * 16];  // [32 rows of x][16 k]
  threadgroup float ws[32 * 16];  // [32 rows of W][16 k]
  threadgroup float cs[32 * 32];  // the output tile, staged for a bounds-checked write
  const int m0 = int(tg.y) * 32, n0 = int(tg.x) * 32;
  const int sm = (int(sg) / 2) * 16, sn = (int(sg) % 2) * 16;  // this simdgroup's 16x16 block
  simdgroup_float8x8 acc[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) acc[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  for (int k0 = 0; k0 < args.k; k0 += 16) {
    for (int i = int(tid); i < 32 * 16; i += 128) {
      const int r = i / 16, gk = k0 + i % 16;
      xs[i] = (m0 + r < args.m && gk < args.k) ? float(x[long(m0 + r) * args.k + gk]) : 0.0f;
      ws[i] = (n0 + r < args.n && gk < args.k) ? float(w[long(n0 + r) * args.k + gk]) : 0.0f;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int kk = 0; kk < 16; kk += 8) {
      simdgroup_float8x8 a[2];
      simdgroup_float8x8 b[2];
      for (int i = 0; i < 2; ++i) simdgroup_load(a[i], xs + (sm + 8 * i) * 16 + kk, 16);
      for (int j = 0; j < 2; ++j) simdgroup_load(b[j], ws + (sn + 8 * j) * 16 + kk, 16, ulong2(0, 0), true);
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) simdgroup_multiply_accumulate(acc[i][j], a[i], b[j], acc[i][j]);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) simdgroup_store(acc[i][j], cs + (sm + 8 * i) * 32 + sn + 8 * j, 32);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int i = int(tid); i < 32 * 32; i += 128) {
    const int r = i / 32, c = i % 32;
    if (m0 + r < args.m && n0 + c < args.n)
      y[long(m0 + r) * args.y_stride + n0 + c] = Y(cs[i] + (args.has_bias ? float(bias[n0 + c]) : 0.0f));
  }
}

// <name>: f32 x and y; <name>_act_<adt>: x and y in the 16-bit activation type; <name>_act_<adt>_logits: x in
// it, y f32 (the LM head: logits stay f32)
template [[host_name("matmul_gemv_f32")]] kernel decltype(matmul_gemv<float, float4, float, float4, float>) matmul_gemv<float, float4, float, float4, float>;
template [[host_name("matmul_gemv_f16")]] kernel decltype(matmul_gemv<half, half4, float, float4, float>) matmul_gemv<half, half4, float, float4, float>;
template [[host_name("matmul_gemv_bf16")]] kernel decltype(matmul_gemv<bfloat, bfloat4, float, float4, float>) matmul_gemv<bfloat, bfloat4, float, float4, float>;
template [[host_name("matmul_gemv_f16_act_f16")]] kernel decltype(matmul_gemv<half, half4, half, half4, half>) matmul_gemv<half, half4, half, half4, half>;
template [[host_name("matmul_gemv_bf16_act_bf16")]] kernel decltype(matmul_gemv<bfloat, bfloat4, bfloat, bfloat4, bfloat>) matmul_gemv<bfloat, bfloat4, bfloat, bfloat4, bfloat>;
template [[host_name("matmul_gemv_f16_act_f16_logits")]] kernel decltype(matmul_gemv<half, half4, half, half4, float>) matmul_gemv<half, half4, half, half4, float>;
template [[host_name("matmul_gemv_bf16_act_bf16_logits")]] kernel decltype(matmul_gemv<bfloat, bfloat4, bfloat, bfloat4, float>) matmul_gemv<bfloat, bfloat4, bfloat, bfloat4, float>;
template [[host_name("matmul_gemm_f32")]] kernel decltype(matmul_gemm<float, float, float>) matmul_gemm<float, float, float>;
template [[host_name("matmul_gemm_f16")]] kernel decltype(matmul_gemm<half, float, float>) matmul_gemm<half, float, float>;
template [[host_name("matmul_gemm_bf16")]] kernel decltype(matmul_gemm<bfloat, float, float>) matmul_gemm<bfloat, float, float>;
template [[host_name("matmul_gemm_f16_act_f16")]] kernel decltype(matmul_gemm<half, half, half>) matmul_gemm<half, half, half>;
template [[host_name("matmul_gemm_bf16_act_bf16")]] kernel decltype(matmul_gemm<bfloat, bfloat, bfloat>) matmul_gemm<bfloat, bfloat, bfloat>;
template [[host_name("matmul_gemm_f16_act_f16_logits")]] kernel decltype(matmul_gemm<half, half, float>) matmul_gemm<half, half, float>;
template [[host_name("matmul_gemm_bf16_act_bf16_logits")]] kernel decltype(matmul_gemm<bfloat, bfloat, float>) matmul_gemm<bfloat, bfloat, float>;
