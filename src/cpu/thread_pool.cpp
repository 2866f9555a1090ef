#include "thread_pool.h"

#include <chrono>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define ME_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define ME_CPU_RELAX() asm volatile("yield")
#else
#define ME_CPU_RELAX() ((void)0)
#endif

namespace metal_engine::cpu {

ThreadPool::ThreadPool(int num_threads) {
  if (num_threads <= 0) num_threads = int(std::max(1u, std::thread::hardware_concurrency()));
  num_threads_ = num_threads;
  for (int t = 1; t < num_threads_; ++t) threads_.emplace_back([this, t] { worker(t); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_.store(true);
  }
  cv_.notify_all();
  for (auto& th : threads_) th.join();
}

void ThreadPool::run(const std::function<void(int)>& fn) {
  if (num_threads_ == 1) { fn(0); return; }
  task_ = &fn;
  pending_.store(num_threads_ - 1, std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lk(mu_);
    generation_.fetch_add(1, std::memory_order_release);
  }
  cv_.notify_all();
  fn(0);
  while (pending_.load(std::memory_order_acquire) != 0) ME_CPU_RELAX();
}

void ThreadPool::worker(int tid) {
  using clock = std::chrono::steady_clock;
  uint64_t seen = 0;
  while (true) {
    auto start = clock::now();
    unsigned spins = 0;
    while (generation_.load(std::memory_order_acquire) == seen && !stop_.load(std::memory_order_relaxed)) {
      ME_CPU_RELAX();
      if ((++spins & 255u) == 0 && clock::now() - start > std::chrono::microseconds(200)) {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return generation_.load(std::memory_order_acquire) != seen || stop_.load(); });
      }
    }
    if (stop_.load()) return;
    seen = generation_.load(std::memory_order_acquire);
    (*task_)(tid);
    pending_.fetch_sub(1, std::memory_order_release);
  }
}

}  // namespace metal_engine::cpu
