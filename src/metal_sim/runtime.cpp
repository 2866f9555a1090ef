#include "runtime.h"

#include <ucontext.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>

namespace metal_sim {

namespace {

constexpr int kSimdWidth = 32;
constexpr size_t kStackBytes = 64 << 10;
constexpr size_t kMaxCollectiveBytes = 64;

std::map<std::string, KernelEntry>& registry() {
  static std::map<std::string, KernelEntry> r;
  return r;
}

enum class State { Runnable, AtBarrier, AtCollective, Done };

struct Fiber {
  ucontext_t ctx;
  ThreadContext tc;
  State state = State::Runnable;
  // a pending simd collective
  unsigned char value[kMaxCollectiveBytes];
  size_t bytes = 0;
  Combine combine = nullptr;
  const void* extra = nullptr;
  const void* site = nullptr;
  void* out = nullptr;
};

struct Group {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  KernelEntry entry = nullptr;
};

thread_local Group* g_group = nullptr;
thread_local Fiber* g_fiber = nullptr;

void fiber_main() {
  g_group->entry(g_fiber->tc);
  g_fiber->state = State::Done;  // uc_link returns to the scheduler
}

void yield_to_scheduler() { swapcontext(&g_fiber->ctx, &g_group->scheduler); }

// Releases every set of lanes (same simdgroup, same call site) waiting at a collective. Returns whether
// any were released.
bool release_collectives(Group& g) {
  std::map<std::pair<uint32_t, const void*>, std::vector<Fiber*>> sets;
  for (Fiber& f : g.fibers)
    if (f.state == State::AtCollective) sets[{f.tc.simdgroup_index_in_threadgroup, f.site}].push_back(&f);
  for (auto& kv : sets) {
    std::vector<Fiber*>& lanes = kv.second;
    std::sort(lanes.begin(), lanes.end(),
              [](Fiber* a, Fiber* b) { return a->tc.thread_index_in_simdgroup < b->tc.thread_index_in_simdgroup; });
    const size_t bytes = lanes[0]->bytes;
    std::vector<unsigned char> values(size_t(kSimdWidth) * bytes, 0);
    for (Fiber* f : lanes) std::memcpy(values.data() + f->tc.thread_index_in_simdgroup * bytes, f->value, bytes);
    // Lanes not in the set keep zeros; combine functions see which lanes took part through `lanes`.
    unsigned mask = 0;
    for (Fiber* f : lanes) mask |= 1u << f->tc.thread_index_in_simdgroup;
    for (Fiber* f : lanes) {
      f->combine(values.data(), int(mask), int(f->tc.thread_index_in_simdgroup), static_cast<unsigned char*>(f->out),
                 f->extra);
      f->state = State::Runnable;
    }
  }
  return !sets.empty();
}

void run_group(Group& g, std::vector<std::vector<char>>& stacks, const DispatchOptions& opt) {
  const int n = int(g.fibers.size());
  for (int i = 0; i < n; ++i) {
    Fiber& f = g.fibers[size_t(i)];
    f.state = State::Runnable;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stacks[size_t(i)].data();
    f.ctx.uc_stack.ss_size = stacks[size_t(i)].size();
    f.ctx.uc_link = &g.scheduler;
    makecontext(&f.ctx, fiber_main, 0);
  }
  g_group = &g;
  while (true) {
    for (int k = 0; k < n; ++k) {
      Fiber& f = g.fibers[size_t(opt.reverse_order ? n - 1 - k : k)];
      if (f.state != State::Runnable) continue;
      g_fiber = &f;
      swapcontext(&g.scheduler, &f.ctx);
    }
    int done = 0, at_barrier = 0, at_collective = 0;
    for (const Fiber& f : g.fibers) {
      done += f.state == State::Done;
      at_barrier += f.state == State::AtBarrier;
      at_collective += f.state == State::AtCollective;
    }
    if (done == n) break;
    if (at_collective && release_collectives(g)) continue;
    if (at_barrier == n - done) {
      if (done > 0)
        throw std::runtime_error("metal-sim: " + std::to_string(done) + " thread(s) of a threadgroup returned while " +
                                 std::to_string(at_barrier) +
                                 " wait at threadgroup_barrier (every thread must reach every barrier)");
      for (Fiber& f : g.fibers) f.state = State::Runnable;
      continue;
    }
    throw std::runtime_error("metal-sim: deadlock: threads wait at different barriers or collectives");
  }
  g_group = nullptr;
  g_fiber = nullptr;
}

}  // namespace

bool register_kernel(const char* name, KernelEntry entry) {
  registry()[name] = entry;
  return true;
}

std::vector<std::string> kernel_names() {
  std::vector<std::string> v;
  for (const auto& kv : registry()) v.push_back(kv.first);
  return v;
}

void dispatch(const std::string& name, void* const* buffers, Dim3 groups, Dim3 threads, const DispatchOptions& opt) {
  auto it = registry().find(name);
  if (it == registry().end()) throw std::invalid_argument("metal-sim has no kernel '" + name + "'");
  const uint64_t per_group = uint64_t(threads.x) * threads.y * threads.z;
  if (per_group == 0 || groups.x == 0 || groups.y == 0 || groups.z == 0)
    throw std::invalid_argument("metal-sim: empty dispatch of '" + name + "'");
  if (per_group > uint64_t(opt.max_threads_per_threadgroup))
    throw std::invalid_argument("metal-sim: " + std::to_string(per_group) + " threads per threadgroup for '" + name +
                                "' exceed the pipeline's maximum of " + std::to_string(opt.max_threads_per_threadgroup));
  Group g;
  g.entry = it->second;
  g.fibers.resize(per_group);
  std::vector<std::vector<char>> stacks(per_group, std::vector<char>(kStackBytes));
  for (uint32_t gz = 0; gz < groups.z; ++gz)
    for (uint32_t gy = 0; gy < groups.y; ++gy)
      for (uint32_t gx = 0; gx < groups.x; ++gx) {
        uint32_t index = 0;
        for (uint32_t tz = 0; tz < threads.z; ++tz)
          for (uint32_t ty = 0; ty < threads.y; ++ty)
            for (uint32_t tx = 0; tx < threads.x; ++tx, ++index) {
              ThreadContext& tc = g.fibers[index].tc;
              tc.buffers = buffers;
              tc.thread_position_in_threadgroup = {tx, ty, tz};
              tc.threadgroup_position_in_grid = {gx, gy, gz};
              tc.threads_per_threadgroup = threads;
              tc.threadgroups_per_grid = groups;
              tc.thread_position_in_grid = {gx * threads.x + tx, gy * threads.y + ty, gz * threads.z + tz};
              tc.thread_index_in_threadgroup = index;
              tc.thread_index_in_simdgroup = index % kSimdWidth;
              tc.simdgroup_index_in_threadgroup = index / kSimdWidth;
            }
        run_group(g, stacks, opt);
      }
}

void barrier() {
  if (!g_fiber) throw std::logic_error("threadgroup_barrier outside a metal-sim dispatch");
  g_fiber->state = State::AtBarrier;
  yield_to_scheduler();
}

const ThreadContext& current() { return g_fiber->tc; }

void simd_collective(const void* value, size_t bytes, Combine combine, const void* extra, void* out) {
  Fiber* f = g_fiber;
  std::memcpy(f->value, value, bytes);
  f->bytes = bytes;
  f->combine = combine;
  f->extra = extra;
  f->out = out;
  f->site = __builtin_return_address(0);
  f->state = State::AtCollective;
  yield_to_scheduler();
}

}  // namespace metal_sim
