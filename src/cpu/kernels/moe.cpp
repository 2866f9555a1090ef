// The mixture-of-experts ops (Mixtral, Qwen3-MoE):
//  - moe_route: softmax of each token's router logits, its top_k experts and their (renormalised) weights;
//  - moe_matmul_<wdt> (f32, f16, bf16 and the quantized formats): the selected experts' projection, rows grouped by expert, each expert's weights streamed
//    once through the matmul kernel's GEMV (1-3 rows) or GEMM tiles; experts no row selects are not read;
//  - moe_combine: each token's weighted sum over its experts' outputs.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "../counters.h"
#include "../cpu_kernels.h"
#include "../quant_blocks.h"

namespace metal_engine::cpu {

namespace {

std::atomic<int64_t> g_expert_matmuls{0};

template <class W>
struct is_quant_format : std::false_type {};
template <QuantType Q>
struct is_quant_format<std::integral_constant<QuantType, Q>> : std::true_type {};

void moe_route(const MoeRouteArgs& a, void* const* b, ThreadPool& pool) {
  const float* logits = static_cast<const float*>(b[0]);  // [num_tokens, num_experts]
  int32_t* ids = static_cast<int32_t*>(b[1]);              // [num_tokens, top_k]
  float* weights = static_cast<float*>(b[2]);              // [num_tokens, top_k]
  const int E = a.num_experts, K = a.top_k;
  pool.parallel_for(a.num_tokens, [&](int64_t t0, int64_t t1) {
    std::vector<float> p(static_cast<size_t>(E));
    std::vector<int> order(static_cast<size_t>(E));
    for (int64_t t = t0; t < t1; ++t) {
      const float* l = logits + t * E;
      const float mx = *std::max_element(l, l + E);
      double sum = 0.0;
      for (int e = 0; e < E; ++e) sum += (p[size_t(e)] = std::exp(l[e] - mx));
      for (int e = 0; e < E; ++e) p[size_t(e)] = float(p[size_t(e)] / sum);
      for (int e = 0; e < E; ++e) order[size_t(e)] = e;
      std::partial_sort(order.begin(), order.begin() + K, order.end(), [&](int x, int y) {
        return p[size_t(x)] > p[size_t(y)] || (p[size_t(x)] == p[size_t(y)] && x < y);
      });
      float top = 0.0f;
      for (int j = 0; j < K; ++j) top += p[size_t(order[size_t(j)])];
      for (int j = 0; j < K; ++j) {
        ids[t * K + j] = order[size_t(j)];
        weights[t * K + j] = a.renormalize ? p[size_t(order[size_t(j)])] / top : p[size_t(order[size_t(j)])];
      }
    }
  });
}

// W: f32, f16, bf16, or a quantized format (QuantFormat<Q>: expert e's rows at e * n * row bytes)
template <class W>
void moe_matmul(const MoeMatmulArgs& a, void* const* b, ThreadPool& pool) {
  const float* x = static_cast<const float*>(b[0]);  // [rows / x_row_div, k]
  const void* w = b[1];                              // [num_experts, n, k]
  const int32_t* ids = static_cast<const int32_t*>(b[2]);  // [rows]
  float* y = static_cast<float*>(b[3]);              // [rows, n]
  const int N = a.n, K = a.k, E = a.num_experts;
  // the rows of each expert, in row order
  std::vector<std::vector<int>> rows_of(static_cast<size_t>(E));
  for (int r = 0; r < a.rows; ++r) {
    const int e = ids[r];
    if (e >= 0 && e < E) rows_of[size_t(e)].push_back(r);
    else std::fill(y + int64_t(r) * N, y + int64_t(r + 1) * N, 0.0f);
  }
  thread_local std::vector<float> xs, ys;  // one expert's rows of x, and its outputs
  for (int e = 0; e < E; ++e) {
    const std::vector<int>& rows = rows_of[size_t(e)];
    if (rows.empty()) continue;
    const int m = int(rows.size());
    xs.resize(size_t(m) * K);
    ys.resize(size_t(m) * N);
    for (int i = 0; i < m; ++i)
      std::copy_n(x + int64_t(rows[size_t(i)] / a.x_row_div) * K, K, xs.data() + int64_t(i) * K);
    if constexpr (is_quant_format<W>::value) {
      const uint8_t* we = static_cast<const uint8_t*>(w) + int64_t(e) * N * quant_row_bytes(W::value, K);
      quant_matmul_rows(W::value, xs.data(), m, K, we, ys.data(), N, pool);
    } else {
      matmul_rows(xs.data(), m, K, static_cast<const W*>(w) + int64_t(e) * N * K, ys.data(), N, pool);
    }
    for (int i = 0; i < m; ++i) std::copy_n(ys.data() + int64_t(i) * N, N, y + int64_t(rows[size_t(i)]) * N);
    g_expert_matmuls.fetch_add(1, std::memory_order_relaxed);
  }
}

void moe_combine(const MoeCombineArgs& a, void* const* b, ThreadPool& pool) {
  const float* y = static_cast<const float*>(b[0]);        // [num_tokens * top_k, dim]
  const float* weights = static_cast<const float*>(b[1]);  // [num_tokens, top_k]
  float* out = static_cast<float*>(b[2]);                  // [num_tokens, dim]
  const int D = a.dim, K = a.top_k;
  pool.parallel_for(a.num_tokens, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* o = out + t * D;
      std::fill(o, o + D, 0.0f);
      for (int j = 0; j < K; ++j) {
        const float wj = weights[t * K + j];
        const float* yr = y + (t * K + j) * D;
        for (int i = 0; i < D; ++i) o[i] += wj * yr[i];
      }
    }
  });
}

}  // namespace

int64_t moe_expert_matmuls() { return g_expert_matmuls.load(); }

void add_moe_kernels(std::vector<KernelDef>& table) {
  table.push_back(make_kernel<MoeRouteArgs>("moe_route", 3, moe_route));
  table.push_back(make_kernel<MoeMatmulArgs>("moe_matmul_f32", 4, moe_matmul<float>));
  table.push_back(make_kernel<MoeMatmulArgs>("moe_matmul_f16", 4, moe_matmul<f16>));
  table.push_back(make_kernel<MoeMatmulArgs>("moe_matmul_bf16", 4, moe_matmul<bf16>));
  for (QuantType q : quant_types())
    with_format(q, [&](auto tag) {
      table.push_back(make_kernel<MoeMatmulArgs>(std::string("moe_matmul_") + quant_info(q).name, 4,
                                                 moe_matmul<decltype(tag)>));
    });
  table.push_back(make_kernel<MoeCombineArgs>("moe_combine", 3, moe_combine));
}

}  // namespace metal_engine::cpu
