// The mixture-of-experts ops (Mixtral, Qwen3-MoE); semantics in op_args.h. Host: src/metal/dispatch_geometry.cpp.
//  - moe_route: one simdgroup per token: softmax of its router logits, then top_k passes of a simdgroup argmax
//    (largest probability, the lower id on ties) over the experts not yet chosen.
//  - moe_matmul_<wdt>: one threadgroup per (expert, 4 rows of W): it scans the step's ids and, for each row that
//    chose its expert, one simdgroup per W row takes the dot product (lanes over k, simd_sum). An expert's
//    weights are read only by the rows that chose it, and not at all when none did.
//  - moe_combine: one threadgroup per token, threads over dim.
#include <metal_stdlib>
#include "op_args.h"
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
template [[host_name("moe_combine")]] kernel decltype(moe_combine<float>) moe_combine<float>;
template [[host_name("moe_combine_act_f16")]] kernel decltype(moe_combine<half>) moe_combine<half>;
template [[host_name("moe_combine_act_bf16")]] kernel decltype(moe_combine<bfloat>) moe_combine<bfloat>;
