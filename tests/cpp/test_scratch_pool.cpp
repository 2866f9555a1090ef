#include <gtest/gtest.h>

#include "metal_engine/config.h"
#include "metal_engine/device.h"
#include "metal_engine/scratch_pool.h"

using namespace metal_engine;

static std::unique_ptr<Device> cpu() {
  EngineConfig c;
  c.num_threads = 1;
  return create_device(c);
}

TEST(ScratchPool, AlignsAndTracksHighWater) {
  auto dev = cpu();
  ScratchPool pool(*dev, 4096);
  pool.begin();
  BufferArg a = pool.alloc(10, "a");
  BufferArg b = pool.alloc(300, "b");
  EXPECT_EQ(a.offset, 0u);
  EXPECT_EQ(b.offset, ScratchPool::kAlignment);
  EXPECT_EQ(pool.used(), ScratchPool::kAlignment + 300);
  EXPECT_EQ(pool.high_water_mark(), ScratchPool::kAlignment + 300);
  pool.begin();  // a new step starts from the bottom; the high-water mark stays
  EXPECT_EQ(pool.alloc(8, "c").offset, 0u);
  EXPECT_EQ(pool.high_water_mark(), ScratchPool::kAlignment + 300);
  EXPECT_NE(pool.host_ptr(b), nullptr);
}

TEST(ScratchPool, ExhaustionNamesTheKnobAndTheSize) {
  auto dev = cpu();
  ScratchPool pool(*dev, 1024);
  pool.begin();
  pool.alloc(1000, "x");
  try {
    pool.alloc(5 << 20, "logits");
    FAIL() << "expected ScratchPoolExhausted";
  } catch (const ScratchPoolExhausted& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("scratch_pool_mb"), std::string::npos) << m;
    EXPECT_NE(m.find("VLLM_METAL_SCRATCH_POOL_MB"), std::string::npos) << m;
    EXPECT_NE(m.find(std::to_string(1024 + (5 << 20))), std::string::npos) << m;
  }
}

TEST(ScratchPool, MeasuringCountsWithoutLimit) {
  auto dev = cpu();
  ScratchPool pool(*dev, 1024);
  pool.begin(/*measuring=*/true);
  BufferArg a = pool.alloc(1 << 20, "big");
  EXPECT_EQ(a.buffer, nullptr);
  EXPECT_EQ(pool.used(), size_t(1) << 20);
  EXPECT_EQ(pool.high_water_mark(), 0u);
  EXPECT_THROW(pool.require(pool.used()), ScratchPoolExhausted);
  EXPECT_NO_THROW(pool.require(1024));
}

TEST(ScratchPool, CapacityFromEnvironment) {
  EngineConfig c;
  setenv("VLLM_METAL_SCRATCH_POOL_MB", "64", 1);
  c.apply_env();
  EXPECT_EQ(c.scratch_pool_mb, 64u);
  setenv("VLLM_METAL_SCRATCH_POOL_MB", "-3", 1);
  EXPECT_THROW(c.apply_env(), std::invalid_argument);
  unsetenv("VLLM_METAL_SCRATCH_POOL_MB");
}
