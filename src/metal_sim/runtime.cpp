#include "runtime.h"

#include <ucontext.h>

// Fiber switches: a dozen instructions of x86-64 assembly (callee-saved registers and the stack pointer)
// where possible, about 20x faster than ucontext, which calls into the kernel for the signal mask; ucontext
// elsewhere and under AddressSanitizer, which knows how to follow it.
#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define ME_SIM_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define ME_SIM_ASAN 1
#endif
#if defined(__x86_64__) && defined(__linux__) && !defined(ME_SIM_ASAN)
#define ME_SIM_ASM_FIBERS 1
// void me_sim_switch(void** save_sp, void* next_sp): saves the callee-saved registers on this stack, stores
// the stack pointer in *save_sp, switches to next_sp and restores what was saved there.
asm(R"(
  .text
  .globl me_sim_switch
  .type me_sim_switch, @function
me_sim_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size me_sim_switch, .-me_sim_switch
  .section .note.GNU-stack,"",@progbits
  .text
)");
extern "C" void me_sim_switch(void** save_sp, void* next_sp);
#endif

#include <algorithm>
#include <cstring>
#include <map>
#include <tuple>
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

struct ConstantSlot {
  ConstantSetter set;
  size_t size;
};
std::map<std::string, std::map<int, ConstantSlot>>& constant_registry() {
  static std::map<std::string, std::map<int, ConstantSlot>> r;
  return r;
}

enum class State { Runnable, AtBarrier, AtCollective, Done };

struct Fiber {
  ucontext_t ctx;
  void* sp = nullptr;  // saved stack pointer (asm fibers)
  ThreadContext tc;
  State state = State::Runnable;
  // a pending simd collective
  unsigned char value[kMaxCollectiveBytes];
  size_t bytes = 0;
  Combine combine = nullptr;
  const void* extra = nullptr;
  const char* site_file = nullptr;  // the collective it waits at (simd_collective)
  int site_line = 0;
  void* out = nullptr;
};

struct Group {
  ucontext_t scheduler;
  void* scheduler_sp = nullptr;
  std::vector<Fiber> fibers;
  KernelEntry entry = nullptr;
  std::vector<const void*> tg_arrays;  // threadgroup arrays declared so far (each counted once)
  size_t tg_bytes = 0;
};

thread_local Group* g_group = nullptr;
thread_local Fiber* g_fiber = nullptr;

void fiber_main() {
  g_group->entry(g_fiber->tc);
  g_fiber->state = State::Done;  // uc_link returns to the scheduler (ucontext)
#if ME_SIM_ASM_FIBERS
  me_sim_switch(&g_fiber->sp, g_group->scheduler_sp);  // never resumed
#endif
}

void yield_to_scheduler() {
#if ME_SIM_ASM_FIBERS
  me_sim_switch(&g_fiber->sp, g_group->scheduler_sp);
#else
  swapcontext(&g_fiber->ctx, &g_group->scheduler);
#endif
}

void resume(Group& g, Fiber& f) {
  g_fiber = &f;
#if ME_SIM_ASM_FIBERS
  me_sim_switch(&g.scheduler_sp, f.sp);
#else
  swapcontext(&g.scheduler, &f.ctx);
#endif
}

// Lays out a new fiber's stack so that the first switch to it "returns" into fiber_main.
void start_fiber(Group& g, Fiber& f, std::vector<char>& stack) {
#if ME_SIM_ASM_FIBERS
  (void)g;
  uintptr_t top = reinterpret_cast<uintptr_t>(stack.data() + stack.size()) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                                        // fiber_main's would-be return address: never used
  *--sp = reinterpret_cast<void*>(&fiber_main);           // where me_sim_switch's ret goes
  for (int i = 0; i < 6; ++i) *--sp = nullptr;            // rbp rbx r12 r13 r14 r15
  uint32_t fp[2] = {0x1f80u, 0x037fu};                    // default MXCSR and x87 control word
  --sp;
  std::memcpy(sp, fp, sizeof(fp));
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = stack.data();
  f.ctx.uc_stack.ss_size = stack.size();
  f.ctx.uc_link = &g.scheduler;
  makecontext(&f.ctx, fiber_main, 0);
#endif
}

// Releases every set of lanes (same simdgroup, same call site) waiting at a collective. Returns whether
// any were released.
bool release_collectives(Group& g) {
  std::map<std::tuple<uint32_t, const char*, int>, std::vector<Fiber*>> sets;
  for (Fiber& f : g.fibers)
    if (f.state == State::AtCollective)
      sets[{f.tc.simdgroup_index_in_threadgroup, f.site_file, f.site_line}].push_back(&f);
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
    start_fiber(g, f, stacks[size_t(i)]);
  }
  g_group = &g;
  while (true) {
    for (int k = 0; k < n; ++k) {
      Fiber& f = g.fibers[size_t(opt.reverse_order ? n - 1 - k : k)];
      if (f.state != State::Runnable) continue;
      resume(g, f);
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

namespace {
std::map<std::string, uint64_t>& source_registry() {
  static std::map<std::string, uint64_t> r;
  return r;
}
}  // namespace

bool register_source(const char* file, uint64_t hash) {
  source_registry()[file] = hash;
  return true;
}

uint64_t source_hash(const std::string& file) {
  auto it = source_registry().find(file);
  return it == source_registry().end() ? 0 : it->second;
}

uint64_t fnv1a64(const std::string& text) {
  uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : text) {
    h ^= c;
    h *= 1099511628211ULL;
  }
  return h;
}

bool register_function_constant(const char* kernel, int index, ConstantSetter set, size_t size) {
  constant_registry()[kernel][index] = ConstantSlot{set, size};
  return true;
}

std::vector<int> function_constant_indices(const std::string& kernel) {
  std::vector<int> v;
  auto it = constant_registry().find(kernel);
  if (it != constant_registry().end())
    for (const auto& kv : it->second) v.push_back(kv.first);
  return v;
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
  auto cs = constant_registry().find(name);
  if (cs != constant_registry().end()) {
    for (const auto& kv : cs->second) {
      const FunctionConstant* given = nullptr;
      for (const FunctionConstant& c : opt.constants)
        if (c.index == kv.first) given = &c;
      if (!given)
        throw std::invalid_argument("metal-sim: function constant " + std::to_string(kv.first) + " of '" + name +
                                    "' is not set");
      if (given->value.size() != kv.second.size)
        throw std::invalid_argument("metal-sim: function constant " + std::to_string(kv.first) + " of '" + name +
                                    "' takes " + std::to_string(kv.second.size) + " bytes, got " +
                                    std::to_string(given->value.size()));
      kv.second.set(given->value.data());
    }
  }
  Group g;
  g.entry = it->second;
  g.fibers.resize(per_group);
  // the fibers' stacks, kept by the calling thread between dispatches (interleaving runs one group a call)
  thread_local std::vector<std::vector<char>> stacks;
  if (stacks.size() < per_group) stacks.resize(per_group, std::vector<char>(kStackBytes));
  const uint64_t num_groups = uint64_t(groups.x) * groups.y * groups.z;
  if (opt.only_group >= int64_t(num_groups))
    throw std::invalid_argument("metal-sim: threadgroup " + std::to_string(opt.only_group) + " of a grid of " +
                                std::to_string(num_groups));
  const bool one = opt.only_group >= 0;  // only that group (x fastest): the loops start and stop at it
  const uint64_t og = one ? uint64_t(opt.only_group) : 0;
  const uint32_t x0 = uint32_t(og % groups.x), y0 = uint32_t(og / groups.x % groups.y),
                 z0 = uint32_t(og / groups.x / groups.y);
  for (uint32_t gz = one ? z0 : 0; gz < (one ? z0 + 1 : groups.z); ++gz)
    for (uint32_t gy = one ? y0 : 0; gy < (one ? y0 + 1 : groups.y); ++gy)
      for (uint32_t gx = one ? x0 : 0; gx < (one ? x0 + 1 : groups.x); ++gx) {
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
        g.tg_arrays.clear();
        g.tg_bytes = 0;
        run_group(g, stacks, opt);
        if (g.tg_bytes + opt.dynamic_threadgroup_memory > opt.max_threadgroup_memory)
          throw std::runtime_error("metal-sim: '" + name + "' uses " + std::to_string(g.tg_bytes) +
                                   " bytes of threadgroup arrays and " + std::to_string(opt.dynamic_threadgroup_memory) +
                                   " of dynamic threadgroup memory; the device has " +
                                   std::to_string(opt.max_threadgroup_memory));
      }
}

void declare_threadgroup_memory(const void* array, size_t bytes) {
  Group* g = g_group;
  if (!g) return;
  if (std::find(g->tg_arrays.begin(), g->tg_arrays.end(), array) != g->tg_arrays.end()) return;
  g->tg_arrays.push_back(array);
  g->tg_bytes += bytes;
}

void barrier() {
  if (!g_fiber) throw std::logic_error("threadgroup_barrier outside a metal-sim dispatch");
  g_fiber->state = State::AtBarrier;
  yield_to_scheduler();
}

const ThreadContext& current() { return g_fiber->tc; }

void simd_collective(const void* value, size_t bytes, Combine combine, const void* extra, void* out, const char* file,
                     int line) {
  Fiber* f = g_fiber;
  std::memcpy(f->value, value, bytes);
  f->bytes = bytes;
  f->combine = combine;
  f->extra = extra;
  f->out = out;
  f->site_file = file;
  f->site_line = line;
  f->state = State::AtCollective;
  yield_to_scheduler();
}

}  // namespace metal_sim
