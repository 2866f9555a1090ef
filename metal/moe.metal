// The mixture-of-experts ops (Mixtral, Qwen3-MoE); semantics in op_args.h. Host: src/metal/dispatch_geometry.cpp.
//  - moe_route: one simdgroup per token: softmax of its router logits, then top_k passes of a simdgroup argmax
//    (largest probability, the lower id on ties) over the experts not yet chosen.
//  - moe_matmul_<wdt>: one threadgroup per (expert, 4 rows of W): it scans the step's ids and, for each row that
//    chose its expert, one simdgroup per W row takes the dot product (lanes over k, simd_sum). An expert's
//    weights are read only by the rows that chose it, and not at all when none did.
//  - moe_matmul_<q> (the quantized formats, quant_blocks.h): the same, lanes over W's half-groups of 16 weights,
//    each adding a * sum(q x) + b * sum(x).
//  - moe_combine: one threadgroup per token, threads over dim.
#include <metal_stdlib>
#include "op_args.h"
#include "quant_blocks.h"
using namespace metal;
using namespace metal_engine;

constant int kMoeMaxTopK = 32;

kernel void moe_route(constant MoeRouteArgs& args [[buffer(0)]],
                      device const float* logits [[buffer(1)]],  // [num_tokens, num_experts]
                      device int* ids [[buffer(2)]],          // [num_tokens, top_k]
                      device float* weights [[buffer(3)]],    // [num_tokens, top_k]
                      uint t [[threadgroup_position_in_grid]],
                      uint lane [[thread_index_in_simdgroup]]) {
  threadgroup int chosen[kMoeMaxTopK];
  threadgroup float chosen_p[kMoeMaxTopK];
  const int E = args.num_experts, K = args.top_k;
  device const float* l = logits + long(t) * E;
  float mx = -INFINITY;
  for (int e = lane; e < E; e += 32) mx = max(mx, float(l[e]));
  mx = simd_max(mx);
  float sum = 0.0f;
  for (int e = lane; e < E; e += 32) sum += exp(float(l[e]) - mx);
  sum = simd_sum(sum);
  for (int j = 0; j < K; ++j) {
    float best = -1.0f;
    int best_id = E;
    for (int e = lane; e < E; e += 32) {
      bool taken = false;
      for (int i = 0; i < j; ++i) taken = taken || chosen[i] == e;
      const float p = exp(float(l[e]) - mx) / sum;
      if (!taken && (p > best || (p == best && e < best_id))) {
        best = p;
        best_id = e;
      }
    }
    const float top = simd_max(best);
    const int id = simd_min(best == top ? best_id : E);
    if (lane == 0) {
      chosen[j] = id;
      chosen_p[j] = top;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  if (lane == 0) {
    float total = 0.0f;
    for (int j = 0; j < K; ++j) total += chosen_p[j];
    for (int j = 0; j < K; ++j) {
      ids[long(t) * K + j] = chosen[j];
      weights[long(t) * K + j] = args.renormalize ? chosen_p[j] / total : chosen_p[j];
    }
  }
}

constant int kMoeRowsPerGroup = 4;  // rows of W per threadgroup: one per simdgroup

template <typename W, typename A>
kernel void moe_matmul(constant MoeMatmulArgs& args [[buffer(0)]],
                       device const A* x [[buffer(1)]],      // [rows / x_row_div, k]
                       device const W* w [[buffer(2)]],      // [num_experts, n, k]
                       device const int* ids [[buffer(3)]],  // [rows]
                       device A* y [[buffer(4)]],            // [rows, n]
                       uint3 tg [[threadgroup_position_in_grid]],  // (block of 4 rows of W, expert)
                       uint lane [[thread_index_in_simdgroup]],
                       uint sg [[simdgroup_index_in_threadgroup]]) {
  const int e = int(tg.y), n = int(tg.x) * kMoeRowsPerGroup + int(sg), K = args.k;
  if (n >= args.n) return;
  device const W* wr = w + (long(e) * args.n + n) * K;
  for (int r = 0; r < args.rows; ++r) {
    const int id = ids[r];
    if (e == 0 && (id < 0 || id >= args.num_experts)) {  // an id out of range: a zero row (expert 0 writes it)
      if (lane == 0) y[long(r) * args.n + n] = A(0.0f);
      continue;
    }
    if (id != e) continue;
    device const A* xr = x + long(r / args.x_row_div) * K;
    float acc = 0.0f;
    for (int k = lane; k < K; k += 32) acc += float(xr[k]) * float(wr[k]);
    acc = simd_sum(acc);
    if (lane == 0) y[long(r) * args.n + n] = A(acc);
  }
}

template <typename Q, typename A>
kernel void moe_matmul_q(constant MoeMatmulArgs& args [[buffer(0)]],
                         device const A* x [[buffer(1)]],       // [rows / x_row_div, k]
                         device const uchar* w [[buffer(2)]],   // [num_experts, n, k / Q::kElems blocks]
                         device const int* ids [[buffer(3)]],   // [rows]
                         device A* y [[buffer(4)]],             // [rows, n]
                         uint3 tg [[threadgroup_position_in_grid]],  // (block of 4 rows of W, expert)
                         uint lane [[thread_index_in_simdgroup]],
                         uint sg [[simdgroup_index_in_threadgroup]]) {
  const int e = int(tg.y), n = int(tg.x) * kMoeRowsPerGroup + int(sg), K = args.k;
  if (n >= args.n) return;
  device const uchar* wr = w + (long(e) * args.n + n) * q_row_bytes<Q>(K);
  for (int r = 0; r < args.rows; ++r) {
    const int id = ids[r];
    if (e == 0 && (id < 0 || id >= args.num_experts)) {  // an id out of range: a zero row (expert 0 writes it)
      if (lane == 0) y[long(r) * args.n + n] = A(0.0f);
      continue;
    }
    if (id != e) continue;
    device const A* xr = x + long(r / args.x_row_div) * K;
    float acc = 0.0f;
    for (int h = int(lane); h < K / 16; h += 32) {
      float q[16], a, b, qx = 0.0f, xsum = 0.0f;
      q_codes16<Q>(wr, h, q, a, b);
      for (int i = 0; i < 16; ++i) {
        const float xv = float(xr[16 * h + i]);
        qx += q[i] * xv;
        xsum += xv;
      }
      acc += a * qx + b * xsum;
    }
    acc = simd_sum(acc);
    if (lane == 0) y[long(r) * args.n + n] = A(acc);
  }
}

template <typename A>
kernel void moe_combine(constant MoeCombineArgs& args [[buffer(0)]],
                        device const A* y [[buffer(1)]],            // [num_tokens * top_k, dim]
                        device const float* weights [[buffer(2)]],  // [num_tokens, top_k]
                        device A* out [[buffer(3)]],                // [num_tokens, dim]
                        uint t [[threadgroup_position_in_grid]],
                        uint tid [[thread_position_in_threadgroup]],
                        uint ntg [[threads_per_threadgroup]]) {
  const int D = args.dim, K = args.top_k;
  for (int i = tid; i < D; i += ntg) {
    float acc = 0.0f;
    for (int j = 0; j < K; ++j) acc += weights[long(t) * K + j] * float(y[(long(t) * K + j) * D + i]);
    out[long(t) * D + i] = A(acc);
  }
}

template [[host_name("moe_matmul_f32")]] kernel decltype(moe_matmul<float, float>) moe_matmul<float, float>;
template [[host_name("moe_matmul_f16")]] kernel decltype(moe_matmul<half, float>) moe_matmul<half, float>;
template [[host_name("moe_matmul_bf16")]] kernel decltype(moe_matmul<bfloat, float>) moe_matmul<bfloat, float>;
template [[host_name("moe_matmul_f16_act_f16")]] kernel decltype(moe_matmul<half, half>) moe_matmul<half, half>;
template [[host_name("moe_matmul_bf16_act_bf16")]] kernel decltype(moe_matmul<bfloat, bfloat>) moe_matmul<bfloat, bfloat>;
template [[host_name("moe_matmul_q8_0")]] kernel decltype(moe_matmul_q<QuantQ8_0, float>) moe_matmul_q<QuantQ8_0, float>;
template [[host_name("moe_matmul_q8_0_act_f16")]] kernel decltype(moe_matmul_q<QuantQ8_0, half>) moe_matmul_q<QuantQ8_0, half>;
template [[host_name("moe_matmul_q8_0_act_bf16")]] kernel decltype(moe_matmul_q<QuantQ8_0, bfloat>) moe_matmul_q<QuantQ8_0, bfloat>;
template [[host_name("moe_matmul_q4_0")]] kernel decltype(moe_matmul_q<QuantQ4_0, float>) moe_matmul_q<QuantQ4_0, float>;
template [[host_name("moe_matmul_q4_0_act_f16")]] kernel decltype(moe_matmul_q<QuantQ4_0, half>) moe_matmul_q<QuantQ4_0, half>;
template [[host_name("moe_matmul_q4_0_act_bf16")]] kernel decltype(moe_matmul_q<QuantQ4_0, bfloat>) moe_matmul_q<QuantQ4_0, bfloat>;
template [[host_name("moe_matmul_q4_1")]] kernel decltype(moe_matmul_q<QuantQ4_1, float>) moe_matmul_q<QuantQ4_1, float>;
template [[host_name("moe_matmul_q4_1_act_f16")]] kernel decltype(moe_matmul_q<QuantQ4_1, half>) moe_matmul_q<QuantQ4_1, half>;
template [[host_name("moe_matmul_q4_1_act_bf16")]] kernel decltype(moe_matmul_q<QuantQ4_1, bfloat>) moe_matmul_q<QuantQ4_1, bfloat>;
template [[host_name("moe_matmul_q5_0")]] kernel decltype(moe_matmul_q<QuantQ5_0, float>) moe_matmul_q<QuantQ5_0, float>;
template [[host_name("moe_matmul_q5_0_act_f16")]] kernel decltype(moe_matmul_q<QuantQ5_0, half>) moe_matmul_q<QuantQ5_0, half>;
template [[host_name("moe_matmul_q5_0_act_bf16")]] kernel decltype(moe_matmul_q<QuantQ5_0, bfloat>) moe_matmul_q<QuantQ5_0, bfloat>;
template [[host_name("moe_matmul_q5_1")]] kernel decltype(moe_matmul_q<QuantQ5_1, float>) moe_matmul_q<QuantQ5_1, float>;
template [[host_name("moe_matmul_q5_1_act_f16")]] kernel decltype(moe_matmul_q<QuantQ5_1, half>) moe_matmul_q<QuantQ5_1, half>;
template [[host_name("moe_matmul_q5_1_act_bf16")]] kernel decltype(moe_matmul_q<QuantQ5_1, bfloat>) moe_matmul_q<QuantQ5_1, bfloat>;
template [[host_name("moe_matmul_q4_k")]] kernel decltype(moe_matmul_q<QuantQ4_K, float>) moe_matmul_q<QuantQ4_K, float>;
template [[host_name("moe_matmul_q4_k_act_f16")]] kernel decltype(moe_matmul_q<QuantQ4_K, half>) moe_matmul_q<QuantQ4_K, half>;
template [[host_name("moe_matmul_q4_k_act_bf16")]] kernel decltype(moe_matmul_q<QuantQ4_K, bfloat>) moe_matmul_q<QuantQ4_K, bfloat>;
template [[host_name("moe_matmul_q5_k")]] kernel decltype(moe_matmul_q<QuantQ5_K, float>) moe_matmul_q<QuantQ5_K, float>;
template [[host_name("moe_matmul_q5_k_act_f16")]] kernel decltype(moe_matmul_q<QuantQ5_K, half>) moe_matmul_q<QuantQ5_K, half>;
template [[host_name("moe_matmul_q5_k_act_bf16")]] kernel decltype(moe_matmul_q<QuantQ5_K, bfloat>) moe_matmul_q<QuantQ5_K, bfloat>;
template [[host_name("moe_matmul_q6_k")]] kernel decltype(moe_matmul_q<QuantQ6_K, float>) moe_matmul_q<QuantQ6_K, float>;
template [[host_name("moe_matmul_q6_k_act_f16")]] kernel decltype(moe_matmul_q<QuantQ6_K, half>) moe_matmul_q<QuantQ6_K, half>;
template [[host_name("moe_matmul_q6_k_act_bf16")]] kernel decltype(moe_matmul_q<QuantQ6_K, bfloat>) moe_matmul_q<QuantQ6_K, bfloat>;
template [[host_name("moe_matmul_a8")]] kernel decltype(moe_matmul_q<QuantA8, float>) moe_matmul_q<QuantA8, float>;
template [[host_name("moe_matmul_a8_act_f16")]] kernel decltype(moe_matmul_q<QuantA8, half>) moe_matmul_q<QuantA8, half>;
template [[host_name("moe_matmul_a8_act_bf16")]] kernel decltype(moe_matmul_q<QuantA8, bfloat>) moe_matmul_q<QuantA8, bfloat>;
template [[host_name("moe_matmul_a6")]] kernel decltype(moe_matmul_q<QuantA6, float>) moe_matmul_q<QuantA6, float>;
template [[host_name("moe_matmul_a6_act_f16")]] kernel decltype(moe_matmul_q<QuantA6, half>) moe_matmul_q<QuantA6, half>;
template [[host_name("moe_matmul_a6_act_bf16")]] kernel decltype(moe_matmul_q<QuantA6, bfloat>) moe_matmul_q<QuantA6, bfloat>;
template [[host_name("moe_combine")]] kernel decltype(moe_combine<float>) moe_combine<float>;
template [[host_name("moe_combine_act_f16")]] kernel decltype(moe_combine<half>) moe_combine<half>;
template [[host_name("moe_combine_act_bf16")]] kernel decltype(moe_combine<bfloat>) moe_combine<bfloat>;
