// metal-sim's runtime: barriers, thread orders, collectives and the errors a GPU would not report.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "metal_sim/runtime.h"

using metal_sim::dispatch;
using metal_sim::DispatchOptions;

static std::vector<float> rotate(const char* kernel, int n, bool reverse) {
  std::vector<float> in(static_cast<size_t>(n)), out(static_cast<size_t>(n), -1.f);
  std::iota(in.begin(), in.end(), 1.f);  // no zeros: a stale (zeroed) tile entry must show
  void* bufs[] = {in.data(), out.data()};
  metal_sim::DispatchOptions opt;
  opt.reverse_order = reverse;
  dispatch(kernel, bufs, {1, 1, 1}, {uint32_t(n), 1, 1}, opt);
  return out;
}

TEST(MetalSimRuntime, BarrierMakesTheRotationCorrectInBothOrders) {
  for (bool reverse : {false, true}) {
    std::vector<float> out = rotate("rotate_with_barrier", 100, reverse);
    for (int i = 0; i < 100; ++i) EXPECT_EQ(out[size_t(i)], float((i + 1) % 100 + 1)) << i;
  }
}

TEST(MetalSimRuntime, ReverseOrderExposesAMissingBarrier) {
  std::vector<float> out = rotate("rotate_without_barrier", 100, /*reverse=*/true);
  int wrong = 0;
  for (int i = 0; i < 100; ++i) wrong += out[size_t(i)] != float((i + 1) % 100 + 1);
  EXPECT_GT(wrong, 0);
}

TEST(MetalSimRuntime, ReturnBeforeBarrierIsAnError) {
  std::vector<float> out(64);
  void* bufs[] = {out.data()};
  EXPECT_THROW(dispatch("return_before_barrier", bufs, {1, 1, 1}, {64, 1, 1}), std::runtime_error);
}

TEST(MetalSimRuntime, RefusesTooManyThreadsAndUnknownKernels) {
  std::vector<float> a(2048), b(2048);
  void* bufs[] = {a.data(), b.data()};
  EXPECT_THROW(dispatch("rotate_with_barrier", bufs, {1, 1, 1}, {2048, 1, 1}), std::invalid_argument);
  EXPECT_THROW(dispatch("no_such_kernel", bufs, {1, 1, 1}, {1, 1, 1}), std::invalid_argument);
}

TEST(MetalSimRuntime, RefusesMoreThreadgroupMemoryThanTheDevice) {
  std::vector<float> out(64);
  void* bufs[] = {out.data()};
  try {
    dispatch("too_much_threadgroup_memory", bufs, {1, 1, 1}, {64, 1, 1});
    ADD_FAILURE() << "36 KB of threadgroup arrays were accepted";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("36864 bytes of threadgroup arrays"), std::string::npos) << e.what();
  }
  // rotate_with_barrier's 4 KB tile plus 30000 bytes of dynamic memory: past the limit
  std::vector<float> a(64), b(64);
  void* bufs2[] = {a.data(), b.data()};
  DispatchOptions opt;
  opt.dynamic_threadgroup_memory = 30000;
  EXPECT_THROW(dispatch("rotate_with_barrier", bufs2, {1, 1, 1}, {64, 1, 1}, opt), std::runtime_error);
  opt.dynamic_threadgroup_memory = 0;
  EXPECT_NO_THROW(dispatch("rotate_with_barrier", bufs2, {1, 1, 1}, {64, 1, 1}, opt));
}

TEST(MetalSimRuntime, SimdCollectives) {
  const int n = 80;  // two full simdgroups of 32 and a partial one of 16, over two threadgroups of 40
  std::vector<float> in(static_cast<size_t>(n)), out(static_cast<size_t>(4 * n));
  for (int i = 0; i < n; ++i) in[size_t(i)] = float((i * 7) % 23);
  void* bufs[] = {in.data(), out.data()};
  dispatch("collectives", bufs, {2, 1, 1}, {40, 1, 1});
  for (int i = 0; i < n; ++i) {
    const int group = i / 40, t = i % 40, sg = t / 32, lane = t % 32;
    const int first = group * 40 + sg * 32, count = std::min(32, 40 - sg * 32);
    float sum = 0, mx = -1;
    for (int l = 0; l < count; ++l) {
      sum += in[size_t(first + l)];
      mx = std::max(mx, in[size_t(first + l)]);
    }
    EXPECT_EQ(out[size_t(4 * i + 0)], sum) << i;
    EXPECT_EQ(out[size_t(4 * i + 1)], mx) << i;
    EXPECT_EQ(out[size_t(4 * i + 2)], in[size_t(first + 3)]) << i;
    if ((lane ^ 1) < count) EXPECT_EQ(out[size_t(4 * i + 3)], in[size_t(first + (lane ^ 1))]) << i;
  }
}
