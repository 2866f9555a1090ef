// matmul_<q> for the quantized formats (quant_blocks.h): y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), W [n, k]
// as rows of blocks, x and y f32 or (the _act_ variants) 16-bit, f32 accumulation. The host picks GEMV or GEMM
// by the number of rows as for the float weights (src/metal/metal_kernels.cpp, plan_matmul), with the same grid
// (src/metal/dispatch_geometry.cpp):
//  - matmul_gemv_<q> (m <= 4, decode): 4 simdgroups per threadgroup, each taking 4 rows of W against one row of
//    x. A lane takes 16 values of x at a time (one half-group), reads them once for the 4 rows, and per row adds
//    a * sum(q x) + b * sum(x): the codes are never scaled one by one; then simd_sum.
//  - matmul_gemm_<q> (prefill, batched decode): 32x32 output tiles, K in steps of 32; each step's 32 rows of W
//    are dequantized (64 half-groups, one a thread) into threadgroup memory beside x's tile, then 4 simdgroups
//    each accumulate a 16x16 block as 2x2 simdgroup_float8x8 tiles.
// embedding_<q>: out[t, :] = table[token_ids[t], :] * scale, the row dequantized on gather (a quantized tied
// embedding is also the LM head, through matmul_<q>).
// The bias is in any float type: has_bias = 1 + its DType (1 f32, 2 f16, 3 bf16), as on the cpu backend.
#include <metal_stdlib>
#include <metal_simdgroup_matrix>
#include "op_args.h"
#include "quant_blocks.h"
using namespace metal;
using namespace metal_engine;

constant int kQGemvRows = 4;        // rows of W per simdgroup
constant int kQGemvSimdgroups = 4;  // simdgroups per threadgroup

inline float q_bias_at(device const uchar* bias, int has_bias, int n) {
  if (has_bias == 1) return ((device const float*)bias)[n];
  if (has_bias == 2) return float(((device const half*)bias)[n]);
  if (has_bias == 3) return float(((device const bfloat*)bias)[n]);
  return 0.0f;
}

template <typename Q, typename A, typename Y>
kernel void matmul_gemv_q(constant MatmulArgs& args [[buffer(0)]],
                          device const A* x [[buffer(1)]],         // [m, k]
                          device const uchar* w [[buffer(2)]],     // [n, k / Q::kElems blocks]
                          device const uchar* bias [[buffer(3)]],  // [n] (has_bias)
                          device Y* y [[buffer(4)]],               // [m, y_stride]
                          uint3 tg [[threadgroup_position_in_grid]],
                          uint lane [[thread_index_in_simdgroup]],
                          uint sg [[simdgroup_index_in_threadgroup]]) {
  const int K = args.k, H = K / 16;
  const long row_bytes = q_row_bytes<Q>(K);
  const int row0 = (int(tg.x) * kQGemvSimdgroups + int(sg)) * kQGemvRows;
  device const A* xr = x + long(tg.y) * K;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // [kQGemvRows]
  for (int h = int(lane); h < H; h += 32) {
    float xv[16];
    float xsum = 0.0f;
    for (int i = 0; i < 16; ++i) {
      xv[i] = float(xr[16 * h + i]);
      xsum += xv[i];
    }
    for (int r = 0; r < kQGemvRows; ++r) {
      const int n = row0 + r;
      if (n >= args.n) break;
      float q[16], a, b;
      q_codes16<Q>(w + long(n) * row_bytes, h, q, a, b);
      float qx = 0.0f;
      for (int i = 0; i < 16; ++i) qx += q[i] * xv[i];
      acc[r] += a * qx + b * xsum;
    }
  }
  for (int r = 0; r < kQGemvRows; ++r) {
    const int n = row0 + r;  // uniform across the simdgroup
    const float sum = simd_sum(acc[r]);
    if (lane == 0 && n < args.n) y[long(tg.y) * args.y_stride + n] = Y(sum + q_bias_at(bias, args.has_bias, n));
  }
}

template <typename Q, typename A, typename Y>
kernel void matmul_gemm_q(constant MatmulArgs& args [[buffer(0)]],
                          device const A* x [[buffer(1)]],         // [m, k]
                          device const uchar* w [[buffer(2)]],     // [n, k / Q::kElems blocks]
                          device const uchar* bias [[buffer(3)]],  // [n] (has_bias)
                          device Y* y [[buffer(4)]],               // [m, y_stride]
                          uint3 tg [[threadgroup_position_in_grid]],
                          uint tid [[thread_index_in_threadgroup]],
                          uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float xs[32 * 32];  // [32 rows of x][32 k]
  threadgroup float ws[32 * 32];  // [32 rows of W][32 k], dequantized
  threadgroup float cs[32 * 32];  // the output tile, staged for a bounds-checked write
  const int K = args.k;
  const long row_bytes = q_row_bytes<Q>(K);
  const int m0 = int(tg.y) * 32, n0 = int(tg.x) * 32;
  const int sm = (int(sg) / 2) * 16, sn = (int(sg) % 2) * 16;  // this simdgroup's 16x16 block
  simdgroup_float8x8 acc[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) acc[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  for (int k0 = 0; k0 < K; k0 += 32) {  // K is whole blocks, so whole steps of 32
    for (int i = int(tid); i < 32 * 32; i += 128) {
      const int r = i / 32;
      xs[i] = m0 + r < args.m ? float(x[long(m0 + r) * K + k0 + i % 32]) : 0.0f;
    }
    if (tid < 64) {  // half-group tid % 2 of this step for row tid / 2 of the tile
      const int r = int(tid) / 2, s = int(tid) % 2;
      threadgroup float* out = ws + r * 32 + 16 * s;
      if (n0 + r < args.n) {
        float q[16], a, b;
        q_codes16<Q>(w + long(n0 + r) * row_bytes, k0 / 16 + s, q, a, b);
        for (int i = 0; i < 16; ++i) out[i] = a * q[i] + b;
      } else {
        for (int i = 0; i < 16; ++i) out[i] = 0.0f;
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int kk = 0; kk < 32; kk += 8) {
      simdgroup_float8x8 a[2];
      simdgroup_float8x8 b[2];
      for (int i = 0; i < 2; ++i) simdgroup_load(a[i], xs + (sm + 8 * i) * 32 + kk, 32);
      for (int j = 0; j < 2; ++j) simdgroup_load(b[j], ws + (sn + 8 * j) * 32 + kk, 32, ulong2(0, 0), true);
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
      y[long(m0 + r) * args.y_stride + n0 + c] = Y(cs[i] + q_bias_at(bias, args.has_bias, n0 + c));
  }
}

template <typename Q, typename A>
kernel void embedding_q(constant EmbeddingArgs& args [[buffer(0)]],
                        device const int* token_ids [[buffer(1)]],  // [num_tokens]
                        device const uchar* table [[buffer(2)]],    // [vocab, hidden / Q::kElems blocks]
                        device A* out [[buffer(3)]],                // [num_tokens, hidden]
                        uint t [[threadgroup_position_in_grid]],
                        uint tid [[thread_position_in_threadgroup]],
                        uint ntg [[threads_per_threadgroup]]) {
  device const uchar* row = table + long(token_ids[t]) * q_row_bytes<Q>(args.hidden);
  device A* o = out + long(t) * args.hidden;
  for (int h = int(tid); h < args.hidden / 16; h += int(ntg)) {
    float q[16], a, b;
    q_codes16<Q>(row, h, q, a, b);
    for (int i = 0; i < 16; ++i) o[16 * h + i] = A((a * q[i] + b) * args.scale);
  }
}

// <kernel>_<q>: f32 x and y; _act_<adt>: x and y 16-bit; _act_<adt>_logits: x 16-bit, y f32 (the LM head)
template [[host_name("matmul_gemv_q8_0")]] kernel decltype(matmul_gemv_q<QuantQ8_0, float, float>) matmul_gemv_q<QuantQ8_0, float, float>;
template [[host_name("matmul_gemv_q8_0_act_f16")]] kernel decltype(matmul_gemv_q<QuantQ8_0, half, half>) matmul_gemv_q<QuantQ8_0, half, half>;
template [[host_name("matmul_gemv_q8_0_act_bf16")]] kernel decltype(matmul_gemv_q<QuantQ8_0, bfloat, bfloat>) matmul_gemv_q<QuantQ8_0, bfloat, bfloat>;
template [[host_name("matmul_gemv_q8_0_act_f16_logits")]] kernel decltype(matmul_gemv_q<QuantQ8_0, half, float>) matmul_gemv_q<QuantQ8_0, half, float>;
template [[host_name("matmul_gemv_q8_0_act_bf16_logits")]] kernel decltype(matmul_gemv_q<QuantQ8_0, bfloat, float>) matmul_gemv_q<QuantQ8_0, bfloat, float>;
template [[host_name("matmul_gemm_q8_0")]] kernel decltype(matmul_gemm_q<QuantQ8_0, float, float>) matmul_gemm_q<QuantQ8_0, float, float>;
template [[host_name("matmul_gemm_q8_0_act_f16")]] kernel decltype(matmul_gemm_q<QuantQ8_0, half, half>) matmul_gemm_q<QuantQ8_0, half, half>;
template [[host_name("matmul_gemm_q8_0_act_bf16")]] kernel decltype(matmul_gemm_q<QuantQ8_0, bfloat, bfloat>) matmul_gemm_q<QuantQ8_0, bfloat, bfloat>;
template [[host_name("matmul_gemm_q8_0_act_f16_logits")]] kernel decltype(matmul_gemm_q<QuantQ8_0, half, float>) matmul_gemm_q<QuantQ8_0, half, float>;
template [[host_name("matmul_gemm_q8_0_act_bf16_logits")]] kernel decltype(matmul_gemm_q<QuantQ8_0, bfloat, float>) matmul_gemm_q<QuantQ8_0, bfloat, float>;
template [[host_name("embedding_q8_0")]] kernel decltype(embedding_q<QuantQ8_0, float>) embedding_q<QuantQ8_0, float>;
template [[host_name("embedding_q8_0_act_f16")]] kernel decltype(embedding_q<QuantQ8_0, half>) embedding_q<QuantQ8_0, half>;
template [[host_name("embedding_q8_0_act_bf16")]] kernel decltype(embedding_q<QuantQ8_0, bfloat>) embedding_q<QuantQ8_0, bfloat>;
template [[host_name("matmul_gemv_q4_0")]] kernel decltype(matmul_gemv_q<QuantQ4_0, float, float>) matmul_gemv_q<QuantQ4_0, float, float>;
template [[host_name("matmul_gemv_q4_0_act_f16")]] kernel decltype(matmul_gemv_q<QuantQ4_0, half, half>) matmul_gemv_q<QuantQ4_0, half, half>;
template [[host_name("matmul_gemv_q4_0_act_bf16")]] kernel decltype(matmul_gemv_q<QuantQ4_0, bfloat, bfloat>) matmul_gemv_q<QuantQ4_0, bfloat, bfloat>;
template [[host_name("matmul_gemv_q4_0_act_f16_logits")]] kernel decltype(matmul_gemv_q<QuantQ4_0, half, float>) matmul_gemv_q<QuantQ4_0, half, float>;
template [[host_name("matmul_gemv_q4_0_act_bf16_logits")]] kernel decltype(matmul_gemv_q<QuantQ4_0, bfloat, float>) matmul_gemv_q<QuantQ4_0, bfloat, float>;
template [[host_name("matmul_gemm_q4_0")]] kernel decltype(matmul_gemm_q<QuantQ4_0, float, float>) matmul_gemm_q<QuantQ4_0, float, float>;
template [[host_name("matmul_gemm_q4_0_act_f16")]] kernel decltype(matmul_gemm_q<QuantQ4_0, half, half>) matmul_gemm_q<QuantQ4_0, half, half>;
template [[host_name("matmul_gemm_q4_0_act_bf16")]] kernel decltype(matmul_gemm_q<QuantQ4_0, bfloat, bfloat>) matmul_gemm_q<QuantQ4_0, bfloat, bfloat>;
template [[host_name("matmul_gemm_q4_0_act_f16_logits")]] kernel decltype(matmul_gemm_q<QuantQ4_0, half, float>) matmul_gemm_q<QuantQ4_0, half, float>;
template [[host_name("matmul_gemm_q4_0_act_bf16_logits")]] kernel decltype(matmul_gemm_q<QuantQ4_0, bfloat, float>) matmul_gemm_q<QuantQ4_0, bfloat, float>;
template [[host_name("embedding_q4_0")]] kernel decltype(embedding_q<QuantQ4_0, float>) embedding_q<QuantQ4_0, float>;
template [[host_name("embedding_q4_0_act_f16")]] kernel decltype(embedding_q<QuantQ4_0, half>) embedding_q<QuantQ4_0, half>;
template [[host_name("embedding_q4_0_act_bf16")]] kernel decltype(embedding_q<QuantQ4_0, bfloat>) embedding_q<QuantQ4_0, bfloat>;
template [[host_name("matmul_gemv_q4_1")]] kernel decltype(matmul_gemv_q<QuantQ4_1, float, float>) matmul_gemv_q<QuantQ4_1, float, float>;
template [[host_name("matmul_gemv_q4_1_act_f16")]] kernel decltype(matmul_gemv_q<QuantQ4_1, half, half>) matmul_gemv_q<QuantQ4_1, half, half>;
template [[host_name("matmul_gemv_q4_1_act_bf16")]] kernel decltype(matmul_gemv_q<QuantQ4_1, bfloat, bfloat>) matmul_gemv_q<QuantQ4_1, bfloat, bfloat>;
template [[host_name("matmul_gemv_q4_1_act_f16_logits")]] kernel decltype(matmul_gemv_q<QuantQ4_1, half, float>) matmul_gemv_q<QuantQ4_1, half, float>;
template [[host_name("matmul_gemv_q4_1_act_bf16_logits")]] kernel decltype(matmul_gemv_q<QuantQ4_1, bfloat, float>) matmul_gemv_q<QuantQ4_1, bfloat, float>;
template [[host_name("matmul_gemm_q4_1")]] kernel decltype(matmul_gemm_q<QuantQ4_1, float, float>) matmul_gemm_q<QuantQ4_1, float, float>;
template [[host_name("matmul_gemm_q4_1_act_f16")]] kernel decltype(matmul_gemm_q<QuantQ4_1, half, half>) matmul_gemm_q<QuantQ4_1, half, half>;
template [[host_name("matmul_gemm_q4_1_act_bf16")]] kernel decltype(matmul_gemm_q<QuantQ4_1, bfloat, bfloat>) matmul_gemm_q<QuantQ4_1, bfloat, bfloat>;
template [[host_name("matmul_gemm_q4_1_act_f16_logits")]] kernel decltype(matmul_gemm_q<QuantQ4_1, half, float>) matmul_gemm_q<QuantQ4_1, half, float>;
template [[host_name("matmul_gemm_q4_1_act_bf16_logits")]] kernel decltype(matmul_gemm_q<QuantQ4_1, bfloat, float>) matmul_gemm_q<QuantQ4_1, bfloat, float>;
template [[host_name("embedding_q4_1")]] kernel decltype(embedding_q<QuantQ4_1, float>) embedding_q<QuantQ4_1, float>;
template [[host_name("embedding_q4_1_act_f16")]] kernel decltype(embedding_q<QuantQ4_1, half>) embedding_q<QuantQ4_1, half>;
template [[host_name("embedding_q4_1_act_bf16")]] kernel decltype(embedding_q<QuantQ4_1, bfloat>) embedding_q<QuantQ4_1, bfloat>;
template [[host_name("matmul_gemv_q5_0")]] kernel decltype(matmul_gemv_q<QuantQ5_0, float, float>) matmul_gemv_q<QuantQ5_0, float, float>;
template [[host_name("matmul_gemv_q5_0_act_f16")]] kernel decltype(matmul_gemv_q<QuantQ5_0, half, half>) matmul_gemv_q<QuantQ5_0, half, half>;
template [[host_name("matmul_gemv_q5_0_act_bf16")]] kernel decltype(matmul_gemv_q<QuantQ5_0, bfloat, bfloat>) matmul_gemv_q<QuantQ5_0, bfloat, bfloat>;
template [[host_name("matmul_gemv_q5_0_act_f16_logits")]] kernel decltype(matmul_gemv_q<QuantQ5_0, half, float>) matmul_gemv_q<QuantQ5_0, half, float>;
template [[host_name("matmul_gemv_q5_0_act_bf16_logits")]] kernel decltype(matmul_gemv_q<QuantQ5_0, bfloat, float>) matmul_gemv_q<QuantQ5_0, bfloat, float>;
template [[host_name("matmul_gemm_q5_0")]] kernel decltype(matmul_gemm_q<QuantQ5_0, float, float>) matmul_gemm_q<QuantQ5_0, float, float>;
template [[host_name("matmul_gemm_q5_0_act_f16")]] kernel decltype(matmul_gemm_q<QuantQ5_0, half, half>) matmul_gemm_q<QuantQ5_0, half, half>;
template [[host_name("matmul_gemm_q5_0_act_bf16")]] kernel decltype(matmul_gemm_q<QuantQ5_0, bfloat, bfloat>) matmul_gemm_q<QuantQ5_0, bfloat, bfloat>;
template [[host_name("matmul_gemm_q5_0_act_f16_logits")]] kernel decltype(matmul_gemm_q<QuantQ5_0, half, float>) matmul_gemm_q<QuantQ5_0, half, float>;
template [[host_name("matmul_gemm_q5_0_act_bf16_logits")]] kernel decltype(matmul_gemm_q<QuantQ5_0, bfloat, float>) matmul_gemm_q<QuantQ5_0, bfloat, float>;
template [[host_name("embedding_q5_0")]] kernel decltype(embedding_q<QuantQ5_0, float>) embedding_q<QuantQ5_0, float>;
template [[host_name("embedding_q5_0_act_f16")]] kernel decltype(embedding_q<QuantQ5_0, half>) embedding_q<QuantQ5_0, half>;
template [[host_name("embedding_q5_0_act_bf16")]] kernel decltype(embedding_q<QuantQ5_0, bfloat>) embedding_q<QuantQ5_0, bfloat>;
template [[host_name("matmul_gemv_q5_1")]] kernel decltype(matmul_gemv_q<QuantQ5_1, float, float>) matmul_gemv_q<QuantQ5_1, float, float>;
template [[host_name("matmul_gemv_q5_1_act_f16")]] kernel decltype(matmul_gemv_q<QuantQ5_1, half, half>) matmul_gemv_q<QuantQ5_1, half, half>;
template [[host_name("matmul_gemv_q5_1_act_bf16")]] kernel decltype(matmul_gemv_q<QuantQ5_1, bfloat, bfloat>) matmul_gemv_q<QuantQ5_1, bfloat, bfloat>;
template [[host_name("matmul_gemv_q5_1_act_f16_logits")]] kernel decltype(matmul_gemv_q<QuantQ5_1, half, float>) matmul_gemv_q<QuantQ5_1, half, float>;
template [[host_name("matmul_gemv_q5_1_act_bf16_logits")]] kernel decltype(matmul_gemv_q<QuantQ5_1, bfloat, float>) matmul_gemv_q<QuantQ5_1, bfloat, float>;
template [[host_name("matmul_gemm_q5_1")]] kernel decltype(matmul_gemm_q<QuantQ5_1, float, float>) matmul_gemm_q<QuantQ5_1, float, float>;
template [[host_name("matmul_gemm_q5_1_act_f16")]] kernel decltype(matmul_gemm_q<QuantQ5_1, half, half>) matmul_gemm_q<QuantQ5_1, half, half>;
template [[host_name("matmul_gemm_q5_1_act_bf16")]] kernel decltype(matmul_gemm_q<QuantQ5_1, bfloat, bfloat>) matmul_gemm_q<QuantQ5_1, bfloat, bfloat>;
template [[host_name("matmul_gemm_q5_1_act_f16_logits")]] kernel decltype(matmul_gemm_q<QuantQ5_1, half, float>) matmul_gemm_q<QuantQ5_1, half, float>;
template [[host_name("matmul_gemm_q5_1_act_bf16_logits")]] kernel decltype(matmul_gemm_q<QuantQ5_1, bfloat, float>) matmul_gemm_q<QuantQ5_1, bfloat, float>;
template [[host_name("embedding_q5_1")]] kernel decltype(embedding_q<QuantQ5_1, float>) embedding_q<QuantQ5_1, float>;
template [[host_name("embedding_q5_1_act_f16")]] kernel decltype(embedding_q<QuantQ5_1, half>) embedding_q<QuantQ5_1, half>;
template [[host_name("embedding_q5_1_act_bf16")]] kernel decltype(embedding_q<QuantQ5_1, bfloat>) embedding_q<QuantQ5_1, bfloat>;
template [[host_name("matmul_gemv_q4_k")]] kernel decltype(matmul_gemv_q<QuantQ4_K, float, float>) matmul_gemv_q<QuantQ4_K, float, float>;
template [[host_name("matmul_gemv_q4_k_act_f16")]] kernel decltype(matmul_gemv_q<QuantQ4_K, half, half>) matmul_gemv_q<QuantQ4_K, half, half>;
template [[host_name("matmul_gemv_q4_k_act_bf16")]] kernel decltype(matmul_gemv_q<QuantQ4_K, bfloat, bfloat>) matmul_gemv_q<QuantQ4_K, bfloat, bfloat>;
template [[host_name("matmul_gemv_q4_k_act_f16_logits")]] kernel decltype(matmul_gemv_q<QuantQ4_K, half, float>) matmul_gemv_q<QuantQ4_K, half, float>;
template [[host_name("matmul_gemv_q4_k_act_bf16_logits")]] kernel decltype(matmul_gemv_q<QuantQ4_K, bfloat, float>) matmul_gemv_q<QuantQ4_K, bfloat, float>;
template [[host_name("matmul_gemm_q4_k")]] kernel decltype(matmul_gemm_q<QuantQ4_K, float, float>) matmul_gemm_q<QuantQ4_K, float, float>;
template [[host_name("matmul_gemm_q4_k_act_f16")]] kernel decltype(matmul_gemm_q<QuantQ4_K, half, half>) matmul_gemm_q<QuantQ4_K, half, half>;
template [[host_name("matmul_gemm_q4_k_act_bf16")]] kernel decltype(matmul_gemm_q<QuantQ4_K, bfloat, bfloat>) matmul_gemm_q<QuantQ4_K, bfloat, bfloat>;
template [[host_name("matmul_gemm_q4_k_act_f16_logits")]] kernel decltype(matmul_gemm_q<QuantQ4_K, half, float>) matmul_gemm_q<QuantQ4_K, half, float>;
template [[host_name("matmul_gemm_q4_k_act_bf16_logits")]] kernel decltype(matmul_gemm_q<QuantQ4_K, bfloat, float>) matmul_gemm_q<QuantQ4_K, bfloat, float>;
template [[host_name("embedding_q4_k")]] kernel decltype(embedding_q<QuantQ4_K, float>) embedding_q<QuantQ4_K, float>;
template [[host_name("embedding_q4_k_act_f16")]] kernel decltype(embedding_q<QuantQ4_K, half>) embedding_q<QuantQ4_K, half>;
template [[host_name("embedding_q4_k_act_bf16")]] kernel decltype(embedding_q<QuantQ4_K, bfloat>) embedding_q<QuantQ4_K, bfloat>;
template [[host_name("matmul_gemv_q5_k")]] kernel decltype(matmul_gemv_q<QuantQ5_K, float, float>) matmul_gemv_q<QuantQ5_K, float, float>;
template [[host_name("matmul_gemv_q5_k_act_f16")]] kernel decltype(matmul_gemv_q<QuantQ5_K, half, half>) matmul_gemv_q<QuantQ5_K, half, half>;
template [[host_name("matmul_gemv_q5_k_act_bf16")]] kernel decltype(matmul_gemv_q<QuantQ5_K, bfloat, bfloat>) matmul_gemv_q<QuantQ5_K, bfloat, bfloat>;
template [[host_name("matmul_gemv_q5_k_act_f16_logits")]] kernel decltype(matmul_gemv_q<QuantQ5_K, half, float>) matmul_gemv_q<QuantQ5_K, half, float>;
template [[host_name("matmul_gemv_q5_k_act_bf16_logits")]] kernel decltype(matmul_gemv_q<QuantQ5_K, bfloat, float>) matmul_gemv_q<QuantQ5_K, bfloat, float>;
template [[host_name("matmul_gemm_q5_k")]] kernel decltype(matmul_gemm_q<QuantQ5_K, float, float>) matmul_gemm_q<QuantQ5_K, float, float>;
template [[host_name("matmul_gemm_q5_k_act_f16")]] kernel decltype(matmul_gemm_q<QuantQ5_K, half, half>) matmul_gemm_q<QuantQ5_K, half, half>;
template [[host_name("matmul_gemm_q5_k_act_bf16")]] kernel decltype(matmul_gemm_q<QuantQ5_K, bfloat, bfloat>) matmul_gemm_q<QuantQ5_K, bfloat, bfloat>;
template [[host_name("matmul_gemm_q5_k_act_f16_logits")]] kernel decltype(matmul_gemm_q<QuantQ5_K, half, float>) matmul_gemm_q<QuantQ5_K, half, float>;
template [[host_name("matmul_gemm_q5_k_act_bf16_logits")]] kernel decltype(matmul_gemm_q<QuantQ5_K, bfloat, float>) matmul_gemm_q<QuantQ5_K, bfloat, float>;
template [[host_name("embedding_q5_k")]] kernel decltype(embedding_q<QuantQ5_K, float>) embedding_q<QuantQ5_K, float>;
template [[host_name("embedding_q5_k_act_f16")]] kernel decltype(embedding_q<QuantQ5_K, half>) embedding_q<QuantQ5_K, half>;
template [[host_name("embedding_q5_k_act_bf16")]] kernel decltype(embedding_q<QuantQ5_K, bfloat>) embedding_q<QuantQ5_K, bfloat>;
template [[host_name("matmul_gemv_q6_k")]] kernel decltype(matmul_gemv_q<QuantQ6_K, float, float>) matmul_gemv_q<QuantQ6_K, float, float>;
template [[host_name("matmul_gemv_q6_k_act_f16")]] kernel decltype(matmul_gemv_q<QuantQ6_K, half, half>) matmul_gemv_q<QuantQ6_K, half, half>;
template [[host_name("matmul_gemv_q6_k_act_bf16")]] kernel decltype(matmul_gemv_q<QuantQ6_K, bfloat, bfloat>) matmul_gemv_q<QuantQ6_K, bfloat, bfloat>;
template [[host_name("matmul_gemv_q6_k_act_f16_logits")]] kernel decltype(matmul_gemv_q<QuantQ6_K, half, float>) matmul_gemv_q<QuantQ6_K, half, float>;
template [[host_name("matmul_gemv_q6_k_act_bf16_logits")]] kernel decltype(matmul_gemv_q<QuantQ6_K, bfloat, float>) matmul_gemv_q<QuantQ6_K, bfloat, float>;
template [[host_name("matmul_gemm_q6_k")]] kernel decltype(matmul_gemm_q<QuantQ6_K, float, float>) matmul_gemm_q<QuantQ6_K, float, float>;
template [[host_name("matmul_gemm_q6_k_act_f16")]] kernel decltype(matmul_gemm_q<QuantQ6_K, half, half>) matmul_gemm_q<QuantQ6_K, half, half>;
template [[host_name("matmul_gemm_q6_k_act_bf16")]] kernel decltype(matmul_gemm_q<QuantQ6_K, bfloat, bfloat>) matmul_gemm_q<QuantQ6_K, bfloat, bfloat>;
template [[host_name("matmul_gemm_q6_k_act_f16_logits")]] kernel decltype(matmul_gemm_q<QuantQ6_K, half, float>) matmul_gemm_q<QuantQ6_K, half, float>;
template [[host_name("matmul_gemm_q6_k_act_bf16_logits")]] kernel decltype(matmul_gemm_q<QuantQ6_K, bfloat, float>) matmul_gemm_q<QuantQ6_K, bfloat, float>;
template [[host_name("embedding_q6_k")]] kernel decltype(embedding_q<QuantQ6_K, float>) embedding_q<QuantQ6_K, float>;
template [[host_name("embedding_q6_k_act_f16")]] kernel decltype(embedding_q<QuantQ6_K, half>) embedding_q<QuantQ6_K, half>;
template [[host_name("embedding_q6_k_act_bf16")]] kernel decltype(embedding_q<QuantQ6_K, bfloat>) embedding_q<QuantQ6_K, bfloat>;
template [[host_name("matmul_gemv_a8")]] kernel decltype(matmul_gemv_q<QuantA8, float, float>) matmul_gemv_q<QuantA8, float, float>;
template [[host_name("matmul_gemv_a8_act_f16")]] kernel decltype(matmul_gemv_q<QuantA8, half, half>) matmul_gemv_q<QuantA8, half, half>;
template [[host_name("matmul_gemv_a8_act_bf16")]] kernel decltype(matmul_gemv_q<QuantA8, bfloat, bfloat>) matmul_gemv_q<QuantA8, bfloat, bfloat>;
template [[host_name("matmul_gemv_a8_act_f16_logits")]] kernel decltype(matmul_gemv_q<QuantA8, half, float>) matmul_gemv_q<QuantA8, half, float>;
template [[host_name("matmul_gemv_a8_act_bf16_logits")]] kernel decltype(matmul_gemv_q<QuantA8, bfloat, float>) matmul_gemv_q<QuantA8, bfloat, float>;
template [[host_name("matmul_gemm_a8")]] kernel decltype(matmul_gemm_q<QuantA8, float, float>) matmul_gemm_q<QuantA8, float, float>;
template [[host_name("matmul_gemm_a8_act_f16")]] kernel decltype(matmul_gemm_q<QuantA8, half, half>) matmul_gemm_q<QuantA8, half, half>;
template [[host_name("matmul_gemm_a8_act_bf16")]] kernel decltype(matmul_gemm_q<QuantA8, bfloat, bfloat>) matmul_gemm_q<QuantA8, bfloat, bfloat>;
template [[host_name("matmul_gemm_a8_act_f16_logits")]] kernel decltype(matmul_gemm_q<QuantA8, half, float>) matmul_gemm_q<QuantA8, half, float>;
template [[host_name("matmul_gemm_a8_act_bf16_logits")]] kernel decltype(matmul_gemm_q<QuantA8, bfloat, float>) matmul_gemm_q<QuantA8, bfloat, float>;
template [[host_name("embedding_a8")]] kernel decltype(embedding_q<QuantA8, float>) embedding_q<QuantA8, float>;
template [[host_name("embedding_a8_act_f16")]] kernel decltype(embedding_q<QuantA8, half>) embedding_q<QuantA8, half>;
template [[host_name("embedding_a8_act_bf16")]] kernel decltype(embedding_q<QuantA8, bfloat>) embedding_q<QuantA8, bfloat>;
template [[host_name("matmul_gemv_a6")]] kernel decltype(matmul_gemv_q<QuantA6, float, float>) matmul_gemv_q<QuantA6, float, float>;
template [[host_name("matmul_gemv_a6_act_f16")]] kernel decltype(matmul_gemv_q<QuantA6, half, half>) matmul_gemv_q<QuantA6, half, half>;
template [[host_name("matmul_gemv_a6_act_bf16")]] kernel decltype(matmul_gemv_q<QuantA6, bfloat, bfloat>) matmul_gemv_q<QuantA6, bfloat, bfloat>;
template [[host_name("matmul_gemv_a6_act_f16_logits")]] kernel decltype(matmul_gemv_q<QuantA6, half, float>) matmul_gemv_q<QuantA6, half, float>;
template [[host_name("matmul_gemv_a6_act_bf16_logits")]] kernel decltype(matmul_gemv_q<QuantA6, bfloat, float>) matmul_gemv_q<QuantA6, bfloat, float>;
template [[host_name("matmul_gemm_a6")]] kernel decltype(matmul_gemm_q<QuantA6, float, float>) matmul_gemm_q<QuantA6, float, float>;
template [[host_name("matmul_gemm_a6_act_f16")]] kernel decltype(matmul_gemm_q<QuantA6, half, half>) matmul_gemm_q<QuantA6, half, half>;
template [[host_name("matmul_gemm_a6_act_bf16")]] kernel decltype(matmul_gemm_q<QuantA6, bfloat, bfloat>) matmul_gemm_q<QuantA6, bfloat, bfloat>;
template [[host_name("matmul_gemm_a6_act_f16_logits")]] kernel decltype(matmul_gemm_q<QuantA6, half, float>) matmul_gemm_q<QuantA6, half, float>;
template [[host_name("matmul_gemm_a6_act_bf16_logits")]] kernel decltype(matmul_gemm_q<QuantA6, bfloat, float>) matmul_gemm_q<QuantA6, bfloat, float>;
template [[host_name("embedding_a6")]] kernel decltype(embedding_q<QuantA6, float>) embedding_q<QuantA6, float>;
template [[host_name("embedding_a6_act_f16")]] kernel decltype(embedding_q<QuantA6, half>) embedding_q<QuantA6, half>;
template [[host_name("embedding_a6_act_bf16")]] kernel decltype(embedding_q<QuantA6, bfloat>) embedding_q<QuantA6, bfloat>;
