// Every product kernel of metal/*.metal once more, built with AddressSanitizer and UndefinedBehaviorSanitizer:
// exact-size heap buffers, so any out-of-bounds access is reported at the .metal line; both thread orders.
// (Correctness against the cpu backend is tests/python/metal_sim/.)
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "../../metal/op_args.h"
#include "metal_engine/quant.h"
#include "metal/dispatch_geometry.h"
#include "metal/metal_kernels.h"
#include "metal_sim/runtime.h"

using namespace metal_engine;

namespace {

std::mt19937 rng(7);

std::vector<float> randn(size_t n) {
  std::normal_distribution<float> d;
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}
std::vector<uint16_t> randh(size_t n) {  // f16/bf16 bit patterns of small numbers (0x3000..0x3bff: 0.125..1)
  std::uniform_int_distribution<int> d(0x3000, 0x3bff);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = uint16_t(d(rng));
  return v;
}

// Runs an MSL function with the grid and function constants the Metal backend would give these arguments.
template <class Args>
void run(const std::string& name, const Args& a, std::vector<void*> buffers) {
  buffers.insert(buffers.begin(), const_cast<Args*>(&a));
  const MetalKernelSpec spec = metal_kernel_spec(name);
  const auto plan = spec.plan(&a);
  const DispatchGeometry& g = plan.second;
  for (bool reverse : {false, true}) {
    metal_sim::DispatchOptions opt;
    opt.reverse_order = reverse;
    for (const auto& c : spec.pipelines[size_t(plan.first)].constants)
      opt.constants.push_back(metal_sim::FunctionConstant{c.first, {static_cast<unsigned char>(c.second)}});
    metal_sim::dispatch(name, buffers.data(), {g.groups[0], g.groups[1], g.groups[2]},
                        {g.threads[0], g.threads[1], g.threads[2]}, opt);
  }
}

// Weights in the kernel's dtype: f32 as floats, f16/bf16 as 16-bit patterns.
struct Weights {
  std::vector<float> f;
  std::vector<uint16_t> h;
  Weights(const std::string& dt, size_t n) {
    if (dt == "f32") f = randn(n);
    else h = randh(n);
  }
  void* data() { return f.empty() ? static_cast<void*>(h.data()) : static_cast<void*>(f.data()); }
};

const char* kDtypes[] = {"f32", "f16", "bf16"};

}  // namespace

TEST(MetalSimKernelsSanitized, ElementwiseAndNorms) {
  for (const char* dt : kDtypes) {
    for (auto [rows, dim] : {std::pair{1, 1}, {3, 7}, {5, 300}}) {
      auto x = randn(size_t(rows) * dim), res = randn(size_t(rows) * dim), out = randn(size_t(rows) * dim);
      Weights w(dt, size_t(dim));
      run(std::string("rms_norm_") + dt, RmsNormArgs{rows, dim, 1e-5f, 1}, {x.data(), res.data(), w.data(), out.data()});
      run(std::string("rms_norm_") + dt, RmsNormArgs{rows, dim, 1e-5f, 0}, {x.data(), nullptr, w.data(), out.data()});
      std::vector<int32_t> ids(static_cast<size_t>(rows));
      for (int i = 0; i < rows; ++i) ids[size_t(i)] = (i * 5) % 11;
      Weights table(dt, size_t(11) * dim);
      run(std::string("embedding_") + dt, EmbeddingArgs{rows, dim, 11, 1.0f}, {ids.data(), table.data(), out.data()});
    }
  }
  auto g = randn(9 * 37), u = randn(9 * 37), o = randn(9 * 37);
  run("silu_mul", SiluMulArgs{9, 37, 37}, {g.data(), u.data(), o.data()});
  run("gelu_tanh_mul", SiluMulArgs{9, 37, 37}, {g.data(), u.data(), o.data()});
  std::vector<int32_t> idx = {2, 0, 1};
  auto src = randn(3 * 17), dst = randn(3 * 17);
  run("gather_rows", GatherRowsArgs{3, 17}, {src.data(), idx.data(), dst.data()});
  auto logits = randn(3 * 1001);
  std::vector<int32_t> best(3);
  run("argmax", ArgmaxArgs{3, 1001}, {logits.data(), best.data()});
}

TEST(MetalSimKernelsSanitized, RopeAndKVWrite) {
  const int T = 5, H = 4, KVH = 2, HD = 16, BS = 4, NB = 3;
  std::vector<int32_t> pos = {0, 3, 7, 100, 4000};
  std::vector<float> inv(HD / 2, 0.01f);
  auto q = randn(T * H * HD), k = randn(T * KVH * HD), v = randn(T * KVH * HD);
  run("rope", RopeArgs{T, H, KVH, HD, HD, H * HD, KVH * HD, 1.0f}, {pos.data(), inv.data(), q.data(), k.data()});
  std::vector<int64_t> slots = {0, 5, -1, 11, 7};
  for (const char* dt : kDtypes) {
    Weights qw(dt, size_t(HD)), kw(dt, size_t(HD));
    run(std::string("qk_norm_") + dt, QKNormArgs{T, H, KVH, HD, H * HD, KVH * HD, 1e-6f}, {q.data(), k.data(), qw.data(), kw.data()});
    Weights kc(dt, size_t(NB) * BS * KVH * HD), vc(dt, size_t(NB) * BS * KVH * HD);
    run(std::string("kv_write_") + dt, KVWriteArgs{T, KVH, HD, BS, NB * BS, KVH * HD, KVH * HD},
        {k.data(), v.data(), slots.data(), kc.data(), vc.data()});
  }
}

TEST(MetalSimKernelsSanitized, MixtureOfExperts) {
  const int T = 5, E = 8, K = 2, H = 33, N = 40;
  auto logits = randn(size_t(T) * E), w_ = randn(size_t(T) * K), x = randn(size_t(T) * H);
  std::vector<int32_t> ids(size_t(T) * K);
  run("moe_route", MoeRouteArgs{T, E, K, 1}, {logits.data(), ids.data(), w_.data()});
  ids[3] = -1;  // not an expert: a zero row
  for (const char* dt : kDtypes) {
    Weights w(dt, size_t(E) * N * H);
    auto y = randn(size_t(T) * K * N);
    run(std::string("moe_matmul_") + dt, MoeMatmulArgs{T * K, N, H, E, K}, {x.data(), w.data(), ids.data(), y.data()});
  }
  auto y = randn(size_t(T) * K * H), out = randn(size_t(T) * H);
  run("moe_combine", MoeCombineArgs{T, K, H}, {y.data(), w_.data(), out.data()});
  for (const std::string dt : {"f16", "bf16"}) {
    auto xh = randh(size_t(T) * H), wh = randh(size_t(E) * N * H), yh = randh(size_t(T) * K * N);
    run("moe_matmul_" + dt + "_act_" + dt, MoeMatmulArgs{T * K, N, H, E, K}, {xh.data(), wh.data(), ids.data(), yh.data()});
    auto y2 = randh(size_t(T) * K * H), o2 = randh(size_t(T) * H);
    run("moe_combine_act_" + dt, MoeCombineArgs{T, K, H}, {y2.data(), w_.data(), o2.data()});
  }
}

TEST(MetalSimKernelsSanitized, Matmul) {
  for (const char* dt : kDtypes)
    for (auto [m, n, k] : {std::tuple{1, 17, 7}, {4, 31, 130}, {7, 40, 33}, {33, 65, 48}}) {
      auto x = randn(size_t(m) * k), y = randn(size_t(m) * n);
      Weights w(dt, size_t(n) * k), b(dt, size_t(n));
      const MatmulArgs a{m, n, k, 1, n};
      run(std::string(matmul_kernel_prefix(a)) + "_" + dt, a, {x.data(), w.data(), b.data(), y.data()});
    }
}

TEST(MetalSimKernelsSanitized, PagedAttention) {
  // two sequences: a 13-token prefill chunk and a decode row at position 39; shuffled blocks
  const int S = 2, H = 9, KVH = 3, HD = 64, BS = 16, W = 3, T = 14, NB = 5;
  std::vector<int32_t> bt = {4, 0, -1, 2, 1, 3};
  std::vector<int32_t> qsl = {0, 13, 14}, lens = {13, 40};
  auto q = randn(T * H * HD), out = randn(T * H * HD);
  for (const char* dt : kDtypes)
    for (int window : {0, 5}) {
      Weights kc(dt, size_t(NB) * BS * KVH * HD), vc(dt, size_t(NB) * BS * KVH * HD);
      const PagedAttentionArgs attn{S, H, KVH, HD, BS, W, H * HD, window, 0.125f, T, 0.0f};
      run(std::string("paged_attention_") + dt, attn,
          {q.data(), kc.data(), vc.data(), bt.data(), qsl.data(), lens.data(), out.data()});
      const int P = 3;  // partitions of 16 keys cover the 40-token context
      std::vector<float> pmax(size_t(T) * H * P), psum(size_t(T) * H * P), pout(size_t(T) * H * P * HD);
      run(std::string("paged_attention_split_") + dt, PagedAttentionSplitArgs{attn, 16, P},
          {q.data(), kc.data(), vc.data(), bt.data(), qsl.data(), lens.data(), pmax.data(), psum.data(), pout.data()});
      run("paged_attention_reduce", PagedAttentionReduceArgs{T, H, HD, P},
          {pmax.data(), psum.data(), pout.data(), out.data()});
      run(std::string("paged_attention_prefill_") + dt, PagedAttentionPrefillArgs{attn, 13},
          {q.data(), kc.data(), vc.data(), bt.data(), qsl.data(), lens.data(), out.data()});
    }
}

TEST(MetalSimKernelsSanitized, DecodeAttentionFusedWithKVWrite) {
  // three sequences, one new token each, written into their slots, then attended
  const int S = 3, H = 4, KVH = 2, HD = 32, BS = 8, W = 3, NB = 6, KS = KVH * HD + 5;
  std::vector<int32_t> bt = {5, 1, -1, 0, 2, 3, 4, -1, -1}, qsl = {0, 1, 2, 3}, lens = {9, 20, 1};
  std::vector<int64_t> slots = {1 * BS + 0, 3 * BS + 3, -1};
  auto q = randn(S * H * HD), k = randn(size_t(S) * KS), v = randn(size_t(S) * KS), out = randn(S * H * HD);
  for (const char* dt : kDtypes) {
    Weights kc(dt, size_t(NB) * BS * KVH * HD), vc(dt, size_t(NB) * BS * KVH * HD);
    const PagedAttentionArgs attn{S, H, KVH, HD, BS, W, H * HD, 0, 0.125f, S, 0.0f};
    run(std::string("paged_attention_decode_") + dt, PagedAttentionDecodeArgs{attn, KS, KS, NB * BS},
        {q.data(), k.data(), v.data(), slots.data(), kc.data(), vc.data(), bt.data(), qsl.data(), lens.data(),
         out.data()});
  }
}

// The 16-bit-activation variants: activations as 16-bit patterns too.
TEST(MetalSimKernelsSanitized, SixteenBitActivations) {
  for (const std::string dt : {"f16", "bf16"}) {
    const std::string x = dt + "_act_" + dt, ax = "_act_" + dt;
    const int rows = 5, dim = 300;
    auto h = randh(size_t(rows) * dim), res = randh(size_t(rows) * dim), out = randh(size_t(rows) * dim);
    auto w = randh(size_t(dim)), table = randh(size_t(11) * dim);
    run("rms_norm_" + x, RmsNormArgs{rows, dim, 1e-5f, 1}, {h.data(), res.data(), w.data(), out.data()});
    run("rms_norm_" + x, RmsNormArgs{rows, dim, 1e-5f, 0}, {h.data(), nullptr, w.data(), out.data()});
    std::vector<int32_t> ids = {3, 0, 10, 4, 4};
    run("embedding_" + x, EmbeddingArgs{rows, dim, 11, 1.0f}, {ids.data(), table.data(), out.data()});
    run("silu_mul" + ax, SiluMulArgs{rows, dim, dim}, {h.data(), res.data(), out.data()});
    run("gelu_tanh_mul" + ax, SiluMulArgs{rows, dim, dim}, {h.data(), res.data(), out.data()});
    std::vector<int32_t> idx = {2, 0, 1};
    run("gather_rows" + ax, GatherRowsArgs{3, dim}, {h.data(), idx.data(), out.data()});
    for (auto [m, n, k] : {std::tuple{1, 17, 8}, {3, 31, 130}, {7, 40, 33}, {33, 65, 48}}) {
      auto xa = randh(size_t(m) * k), ya = randh(size_t(m) * n), wt = randh(size_t(n) * k), b = randh(size_t(n));
      std::vector<float> logits(size_t(m) * n);
      const MatmulArgs a{m, n, k, 1, n};
      const std::string kern = std::string(matmul_kernel_prefix(a)) + "_" + x;
      run(kern, a, {xa.data(), wt.data(), b.data(), ya.data()});
      run(kern + "_logits", a, {xa.data(), wt.data(), b.data(), logits.data()});
    }
    const int S = 2, H = 9, KVH = 3, HD = 64, BS = 16, W = 3, T = 14, NB = 5;
    std::vector<int32_t> pos(T, 7), bt = {4, 0, -1, 2, 1, 3}, qsl = {0, 13, 14}, lens = {13, 40};
    std::vector<float> inv(HD / 2, 0.01f);
    auto q = randh(size_t(T) * H * HD), kk = randh(size_t(T) * KVH * HD), vv = randh(size_t(T) * KVH * HD);
    auto o = randh(size_t(T) * H * HD), kc = randh(size_t(NB) * BS * KVH * HD), vc = randh(size_t(NB) * BS * KVH * HD);
    run("rope" + ax, RopeArgs{T, H, KVH, HD, HD, H * HD, KVH * HD, 1.0f}, {pos.data(), inv.data(), q.data(), kk.data()});
    auto qnw = randh(size_t(HD)), knw = randh(size_t(HD));
    run("qk_norm_" + x, QKNormArgs{T, H, KVH, HD, H * HD, KVH * HD, 1e-6f}, {q.data(), kk.data(), qnw.data(), knw.data()});
    std::vector<int64_t> slots(T, -1);
    slots[0] = 5;
    slots[13] = 3 * BS + 7;
    run("kv_write_" + x, KVWriteArgs{T, KVH, HD, BS, NB * BS, KVH * HD, KVH * HD},
        {kk.data(), vv.data(), slots.data(), kc.data(), vc.data()});
    const PagedAttentionArgs attn{S, H, KVH, HD, BS, W, H * HD, 5, 0.125f, T, 50.0f};
    run("paged_attention_" + x, attn, {q.data(), kc.data(), vc.data(), bt.data(), qsl.data(), lens.data(), o.data()});
    run("paged_attention_prefill_" + x, PagedAttentionPrefillArgs{attn, 13},
        {q.data(), kc.data(), vc.data(), bt.data(), qsl.data(), lens.data(), o.data()});
    const int P = 3;
    std::vector<float> pmax(size_t(T) * H * P), psum(size_t(T) * H * P), pout(size_t(T) * H * P * HD);
    run("paged_attention_split_" + x, PagedAttentionSplitArgs{attn, 16, P},
        {q.data(), kc.data(), vc.data(), bt.data(), qsl.data(), lens.data(), pmax.data(), psum.data(), pout.data()});
    run("paged_attention_reduce" + ax, PagedAttentionReduceArgs{T, H, HD, P},
        {pmax.data(), psum.data(), pout.data(), o.data()});
    // decode: one new token per sequence
    std::vector<int32_t> dqsl = {0, 1, 2}, dlens = {13, 40};
    std::vector<int64_t> dslots = {12, 3 * BS + 7};
    const PagedAttentionArgs dattn{S, H, KVH, HD, BS, W, H * HD, 0, 0.125f, S, 20.0f};
    run("paged_attention_decode_" + x, PagedAttentionDecodeArgs{dattn, KVH * HD, KVH * HD, NB * BS},
        {q.data(), kk.data(), vv.data(), dslots.data(), kc.data(), vc.data(), bt.data(), dqsl.data(), dlens.data(),
         o.data()});
  }
}

// The quantized formats' kernels (matmul_quant.metal, moe.metal): W as exact-size rows of random blocks (any
// code, any scale bits), biases in each float type, every activation flavour.
TEST(MetalSimKernelsSanitized, QuantizedWeights) {
  std::uniform_int_distribution<int> byte(0, 255);
  for (QuantType q : quant_types()) {
    const std::string f = quant_info(q).name;
    const int k = 2 * quant_info(q).block_elems, n = 19, E = 3;
    std::vector<uint8_t> w(size_t(E) * n * quant_row_bytes(q, k));  // E experts' rows, or the first n of them
    for (auto& b : w) b = uint8_t(byte(rng));
    auto bias32 = randn(size_t(n));
    auto bias16 = randh(size_t(n));
    for (int m : {3, 37}) {
      for (int has_bias : {0, 1, 2, 3}) {
        void* bias = has_bias == 0 ? nullptr : has_bias == 1 ? static_cast<void*>(bias32.data()) : bias16.data();
        const MatmulArgs a{m, n, k, has_bias, n};
        const std::string kern = std::string(matmul_kernel_prefix(a)) + "_" + f;
        auto x = randn(size_t(m) * k), y = randn(size_t(m) * n);
        run(kern, a, {x.data(), w.data(), bias, y.data()});
        if (has_bias != 2) continue;  // the 16-bit activations with one bias type
        for (const std::string act : {"f16", "bf16"}) {
          auto xh = randh(size_t(m) * k), yh = randh(size_t(m) * n);
          run(kern + "_act_" + act, a, {xh.data(), w.data(), bias, yh.data()});
          run(kern + "_act_" + act + "_logits", a, {xh.data(), w.data(), bias, y.data()});
        }
      }
    }
    std::vector<int32_t> ids = {18, 0, 7};
    auto out = randn(size_t(3) * k);
    auto outh = randh(size_t(3) * k);
    run("embedding_" + f, EmbeddingArgs{3, k, n, 2.0f}, {ids.data(), w.data(), out.data()});
    for (const std::string act : {"f16", "bf16"})
      run("embedding_" + f + "_act_" + act, EmbeddingArgs{3, k, n, 2.0f}, {ids.data(), w.data(), outh.data()});
    const int T = 4, K = 2;
    std::vector<int32_t> experts = {0, 2, 1, -1, 2, 2, 0, 1};
    auto x = randn(size_t(T) * k), y = randn(size_t(T) * K * n);
    run("moe_matmul_" + f, MoeMatmulArgs{T * K, n, k, E, K}, {x.data(), w.data(), experts.data(), y.data()});
    for (const std::string act : {"f16", "bf16"}) {
      auto xh = randh(size_t(T) * k), yh = randh(size_t(T) * K * n);
      run("moe_matmul_" + f + "_act_" + act, MoeMatmulArgs{T * K, n, k, E, K}, {xh.data(), w.data(), experts.data(), yh.data()});
    }
  }
}
