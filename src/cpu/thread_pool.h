// A persistent pool of worker threads for the cpu kernels. Workers spin briefly between regions (a
// decode step runs hundreds of short parallel regions), then sleep on a condition variable.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace metal_engine::cpu {

class ThreadPool {
 public:
  explicit ThreadPool(int num_threads);  // counts the calling thread; <= 0 means all cores
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return num_threads_; }

  // Runs fn(thread_index) on every thread, the caller being index 0; returns when all are done.
  void run(const std::function<void(int)>& fn);

  // fn(begin, end) over [0, n) split into size() contiguous ranges (bandwidth-bound loops).
  template <class F>
  void parallel_for(int64_t n, F&& fn) {
    if (n <= 0) return;
    const int t = int(std::min<int64_t>(num_threads_, n));
    if (t == 1) { fn(int64_t(0), n); return; }
    run([&](int tid) {
      if (tid >= t) return;
      fn(n * tid / t, n * (tid + 1) / t);
    });
  }

  // fn(i, thread_index) for each i in [0, n), handed out one at a time (uneven work items).
  template <class F>
  void parallel_for_dynamic(int64_t n, F&& fn) {
    if (n <= 0) return;
    if (num_threads_ == 1 || n == 1) { for (int64_t i = 0; i < n; ++i) fn(i, 0); return; }
    std::atomic<int64_t> next{0};
    run([&](int tid) {
      for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
           i = next.fetch_add(1, std::memory_order_relaxed))
        fn(i, tid);
    });
  }

 private:
  void worker(int tid);
  int num_threads_ = 1;
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  const std::function<void(int)>* task_ = nullptr;
};

}  // namespace metal_engine::cpu
