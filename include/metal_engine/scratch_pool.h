// ScratchPool: the per-step arena. One device buffer of `scratch_pool_mb`, carved up anew each step
// by a bump allocator; it records the high-water mark. Running out is an error that names the knob.
// A pool made to grow on demand allocates nothing up front and grows its buffer (never past the capacity) when
// reserve() asks for more: the second pool of two steps in flight, which holds decode steps only.
#pragma once
#include <cstddef>
#include <memory>
#include <stdexcept>
#include <string>

#include "metal_engine/device.h"

namespace metal_engine {

class ScratchPoolExhausted : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class ScratchPool {
 public:
  static constexpr size_t kAlignment = 256;  // Metal's buffer offset alignment, and a cache line

  ScratchPool(Device& device, size_t capacity_bytes, bool grow_on_demand = false);

  // Starts a step's layout. In measuring mode allocations only count bytes (no buffer is touched),
  // so a caller can learn a step's exact need before committing to it.
  void begin(bool measuring = false);
  // Bytes handed out since begin(), alignment included.
  size_t used() const { return used_; }
  // The most bytes in use at once since begin(): what the step needs.
  size_t peak() const { return peak_; }
  BufferArg alloc(size_t bytes, const char* what);
  // Hands back everything allocated since used() was `mark` (a model's per-layer temporaries), so later
  // allocations of the step reuse it. Dispatches run in encode order, each after the ones before it.
  void reset_to(size_t mark);
  // Throws ScratchPoolExhausted if a step needing `bytes` cannot fit: the message names the size and
  // the knobs (scratch_pool_mb, env VLLM_METAL_SCRATCH_POOL_MB).
  void require(size_t bytes) const;
  // require(bytes), then makes the buffer hold at least `bytes` (a pool that grows on demand reallocates it: call
  // only while no submitted step that uses this pool is unfinished).
  void reserve(size_t bytes);

  size_t capacity() const { return capacity_; }
  size_t allocated() const { return allocated_; }  // the buffer's size (capacity unless it grows on demand)
  size_t high_water_mark() const { return high_water_; }
  void* host_ptr(const BufferArg& a) const;

 private:
  Device& device_;
  std::unique_ptr<Buffer> buffer_;
  size_t capacity_ = 0;
  size_t allocated_ = 0;
  size_t used_ = 0;
  size_t peak_ = 0;
  size_t high_water_ = 0;
  bool measuring_ = false;
};

}  // namespace metal_engine
