#include "metal_engine/scratch_pool.h"

#include <algorithm>
#include <sstream>

namespace metal_engine {

static size_t mib_ceil(size_t bytes) { return (bytes + (1u << 20) - 1) >> 20; }

ScratchPool::ScratchPool(Device& device, size_t capacity_bytes, bool grow_on_demand)
    : device_(device), capacity_(capacity_bytes) {
  if (capacity_bytes == 0) throw std::invalid_argument("scratch_pool_mb must be > 0");
  if (!grow_on_demand) {
    buffer_ = device.allocate(capacity_bytes, "scratch pool");
    allocated_ = capacity_bytes;
  }
}

void ScratchPool::reserve(size_t bytes) {
  require(bytes);
  if (buffer_ && allocated_ >= bytes) return;
  const size_t want = std::min(capacity_, std::max(bytes + bytes / 2, size_t(1) << 20));  // room to grow
  buffer_.reset();
  buffer_ = device_.allocate(want, "scratch pool (second step in flight)");
  allocated_ = want;
}

void ScratchPool::begin(bool measuring) {
  used_ = 0;
  peak_ = 0;
  measuring_ = measuring;
}

void ScratchPool::require(size_t bytes) const {
  if (bytes <= capacity_) return;
  std::ostringstream m;
  m << "scratch pool exhausted: this step needs " << bytes << " bytes (" << mib_ceil(bytes)
    << " MiB) of scratch but the pool holds " << capacity_ << " bytes (" << (capacity_ >> 20)
    << " MiB); raise scratch_pool_mb (env VLLM_METAL_SCRATCH_POOL_MB) to at least " << mib_ceil(bytes)
    << ", or schedule fewer tokens or logit rows per step";
  throw ScratchPoolExhausted(m.str());
}

BufferArg ScratchPool::alloc(size_t bytes, const char* what) {
  size_t start = (used_ + kAlignment - 1) / kAlignment * kAlignment;
  size_t end = start + bytes;
  if (!measuring_ && end > allocated_) {
    require(end);  // throws, naming the size needed so far
    throw std::logic_error("ScratchPool: reserve() a step's peak before laying it out");
  }
  (void)what;
  used_ = end;
  if (used_ > peak_) peak_ = used_;
  if (!measuring_ && used_ > high_water_) high_water_ = used_;
  return BufferArg{measuring_ ? nullptr : buffer_.get(), start, bytes};
}

void ScratchPool::reset_to(size_t mark) {
  if (mark > used_) throw std::logic_error("ScratchPool::reset_to past the allocations made");
  used_ = mark;
}

void* ScratchPool::host_ptr(const BufferArg& a) const {
  return static_cast<char*>(buffer_->data()) + a.offset;
}

}  // namespace metal_engine
