// PagedKVCache: per-layer K and V buffers, allocated once, each laid out
// [num_blocks, block_size, num_kv_heads, head_dim]. Block ids are physical and range-checked.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "metal_engine/device.h"
#include "metal_engine/dtype.h"

namespace metal_engine {

struct KVCacheShape {
  int num_layers = 0;
  int num_blocks = 0;
  int block_size = 16;
  int num_kv_heads = 0;
  int head_dim = 0;
  DType dtype = DType::F16;

  size_t bytes_per_block_per_layer() const;  // one of K or V
  size_t bytes_per_block() const;            // K and V of every layer
  // How many blocks fit in `budget_bytes`; throws std::invalid_argument if not even one does.
  static int blocks_for_budget(size_t budget_bytes, const KVCacheShape& shape_without_blocks);
};

class PagedKVCache {
 public:
  PagedKVCache(Device& device, const KVCacheShape& shape);

  const KVCacheShape& shape() const { return shape_; }
  int num_blocks() const { return shape_.num_blocks; }
  int block_size() const { return shape_.block_size; }
  int64_t num_slots() const { return int64_t(shape_.num_blocks) * shape_.block_size; }
  size_t total_bytes() const { return shape_.bytes_per_block() * size_t(shape_.num_blocks); }

  BufferArg key_cache(int layer) const;
  BufferArg value_cache(int layer) const;

  // Throws std::out_of_range naming the id and the valid range.
  void check_block_id(int64_t block_id) const;
  void check_slot(int64_t slot) const;

 private:
  KVCacheShape shape_;
  std::vector<std::unique_ptr<Buffer>> keys_, values_;
};

}  // namespace metal_engine
