#include <gtest/gtest.h>

#include <cstring>

#include "metal_engine/config.h"
#include "metal_engine/kv_cache.h"

using namespace metal_engine;

static KVCacheShape shape(int blocks) {
  KVCacheShape s;
  s.num_layers = 3;
  s.num_blocks = blocks;
  s.block_size = 16;
  s.num_kv_heads = 3;
  s.head_dim = 64;
  s.dtype = DType::F16;
  return s;
}

TEST(PagedKVCache, LayoutAndSizes) {
  EngineConfig c;
  auto dev = create_device(c);
  PagedKVCache kv(*dev, shape(10));
  // [num_blocks, block_size, num_kv_heads, head_dim] f16, per layer, for K and for V
  EXPECT_EQ(kv.shape().bytes_per_block_per_layer(), size_t(16 * 3 * 64 * 2));
  EXPECT_EQ(kv.total_bytes(), size_t(2 * 3 * 10 * 16 * 3 * 64 * 2));
  EXPECT_EQ(kv.num_slots(), 160);
  for (int l = 0; l < 3; ++l) {
    ASSERT_NE(kv.key_cache(l).buffer, nullptr);
    EXPECT_NE(kv.key_cache(l).buffer, kv.value_cache(l).buffer);
    EXPECT_EQ(kv.key_cache(l).buffer->size(), kv.shape().bytes_per_block_per_layer() * 10);
  }
  EXPECT_THROW(kv.key_cache(3), std::out_of_range);
}

TEST(PagedKVCache, BlockIdsAreRangeChecked) {
  EngineConfig c;
  auto dev = create_device(c);
  PagedKVCache kv(*dev, shape(10));
  EXPECT_NO_THROW(kv.check_block_id(0));
  EXPECT_NO_THROW(kv.check_block_id(9));
  EXPECT_THROW(kv.check_block_id(10), std::out_of_range);
  EXPECT_THROW(kv.check_block_id(-1), std::out_of_range);
  EXPECT_NO_THROW(kv.check_slot(159));
  try {
    kv.check_slot(160);
    FAIL();
  } catch (const std::out_of_range& e) {
    EXPECT_NE(std::string(e.what()).find("160 slots (10 blocks x 16)"), std::string::npos) << e.what();
  }
}

TEST(PagedKVCache, BlocksFromMemoryBudget) {
  KVCacheShape s = shape(0);
  const size_t per_block = s.bytes_per_block();  // K+V, all layers
  EXPECT_EQ(KVCacheShape::blocks_for_budget(per_block * 7 + per_block / 2, s), 7);
  EXPECT_THROW(KVCacheShape::blocks_for_budget(per_block - 1, s), std::invalid_argument);
}

TEST(PagedKVCache, RefusesEmptyShapes) {
  EngineConfig c;
  auto dev = create_device(c);
  EXPECT_THROW(PagedKVCache(*dev, shape(0)), std::invalid_argument);
}
