#include "metal_engine/kv_cache.h"

#include <sstream>
#include <stdexcept>
#include <string>

namespace metal_engine {

size_t KVCacheShape::bytes_per_block_per_layer() const {
  return size_t(block_size) * size_t(num_kv_heads) * size_t(head_dim) * dtype_size(dtype);
}

size_t KVCacheShape::bytes_per_block() const {
  return 2 * size_t(num_layers) * bytes_per_block_per_layer();
}

int KVCacheShape::blocks_for_budget(size_t budget_bytes, const KVCacheShape& s) {
  size_t per_block = s.bytes_per_block();
  if (per_block == 0) throw std::invalid_argument("KV cache shape has a zero dimension");
  size_t n = budget_bytes / per_block;
  if (n < 1)
    throw std::invalid_argument("kv_cache_memory is too small: one block of " + std::to_string(s.block_size) +
                                " tokens needs " + std::to_string(per_block) + " bytes for all layers");
  if (n > 0x7fffffff / size_t(s.block_size)) n = 0x7fffffff / size_t(s.block_size);
  return int(n);
}

PagedKVCache::PagedKVCache(Device& device, const KVCacheShape& shape) : shape_(shape) {
  if (shape.num_layers <= 0 || shape.num_blocks <= 0 || shape.block_size <= 0 || shape.num_kv_heads <= 0 ||
      shape.head_dim <= 0)
    throw std::invalid_argument("PagedKVCache: every dimension must be > 0 (num_blocks " +
                                std::to_string(shape.num_blocks) + ", block_size " +
                                std::to_string(shape.block_size) + ")");
  const size_t bytes = shape.bytes_per_block_per_layer() * size_t(shape.num_blocks);
  for (int l = 0; l < shape.num_layers; ++l) {
    keys_.push_back(device.allocate(bytes, "k_cache layer " + std::to_string(l)));
    values_.push_back(device.allocate(bytes, "v_cache layer " + std::to_string(l)));
  }
}

BufferArg PagedKVCache::key_cache(int layer) const { return BufferArg{keys_.at(size_t(layer)).get(), 0}; }
BufferArg PagedKVCache::value_cache(int layer) const { return BufferArg{values_.at(size_t(layer)).get(), 0}; }

void PagedKVCache::check_block_id(int64_t block_id) const {
  if (block_id < 0 || block_id >= shape_.num_blocks)
    throw std::out_of_range("block id " + std::to_string(block_id) + " is out of range: the KV cache has blocks 0.." +
                            std::to_string(shape_.num_blocks - 1));
}

void PagedKVCache::check_slot(int64_t slot) const {
  if (slot >= num_slots())
    throw std::out_of_range("KV slot " + std::to_string(slot) + " does not exist: the cache has " +
                            std::to_string(num_slots()) + " slots (" + std::to_string(shape_.num_blocks) +
                            " blocks x " + std::to_string(shape_.block_size) +
                            "); raise kv_cache_memory or schedule fewer tokens");
}

}  // namespace metal_engine
