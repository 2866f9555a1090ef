// metal-sim's kernel emulator: runs the very .metal kernels (compiled as C++ after tools/metal_prepass.py)
// on the CPU. Each threadgroup's threads run as fibers on one OS thread, so threadgroup_barrier and the
// simd-group collectives (simd_sum, simd_max, ...) behave as on an Apple GPU: a barrier releases when every
// live thread of the group waits on it; a collective releases when every live lane of the simdgroup (32)
// reaches it. A thread that returns while others wait at a barrier is an error, as it hangs a GPU.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace metal_sim {

struct Dim3 {
  uint32_t x = 1, y = 1, z = 1;
};

// What a kernel invocation sees: its bindings and its thread's position.
struct ThreadContext {
  void* const* buffers;          // buffer(0), buffer(1), ...
  Dim3 thread_position_in_threadgroup;
  Dim3 threadgroup_position_in_grid;
  Dim3 threads_per_threadgroup;
  Dim3 threadgroups_per_grid;
  Dim3 thread_position_in_grid;
  uint32_t thread_index_in_threadgroup = 0;
  uint32_t thread_index_in_simdgroup = 0;
  uint32_t simdgroup_index_in_threadgroup = 0;
};

using KernelEntry = void (*)(const ThreadContext&);

// Called by the generated registration code of each kernel translation unit.
bool register_kernel(const char* name, KernelEntry entry);
std::vector<std::string> kernel_names();

struct DispatchOptions {
  bool reverse_order = false;  // run threads last-to-first: exposes missing barriers
  int max_threads_per_threadgroup = 1024;
};

// Runs `name` over `groups` threadgroups of `threads` threads. Throws std::invalid_argument for an unknown
// kernel or a bad geometry, std::runtime_error for a deadlock or a thread that left a barrier behind.
void dispatch(const std::string& name, void* const* buffers, Dim3 groups, Dim3 threads,
              const DispatchOptions& options = {});

// --- used by the compatibility headers (metal_stdlib) -------------------------------------------
void barrier();                                // threadgroup_barrier
const ThreadContext& current();                // the running thread's context
// A simd-group collective: every lane contributes `bytes` bytes at `value`; when the simdgroup's live
// lanes have all arrived, `combine(values, lane_count, lane, out)` computes each lane's result.
using Combine = void (*)(const unsigned char* values, int lanes, int lane, unsigned char* out, const void* extra);
void simd_collective(const void* value, size_t bytes, Combine combine, const void* extra, void* out);

}  // namespace metal_sim
