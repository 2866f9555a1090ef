// The Metal backend's kernel table: which MSL function(s) run a kernel the engine asks for by its
// backend-neutral name ("matmul_f16", "rms_norm_bf16", "rope", ...), with what argument struct, how many
// buffers, and on what grid. Also every MSL function by its own name ("matmul_gemv_f16",
// "paged_attention_split_f32", ...), so tests can launch each one. No metal-cpp here: this file builds with
// any compiler, and metal-sim's tests share it.
#pragma once
#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include "dispatch_geometry.h"

namespace metal_engine {

struct DeviceCaps;  // metal_engine/device.h

// A pipeline: an MSL function specialised by bool function constants ([[function_constant(index)]]).
// The pipeline cache is keyed by key().
struct MetalPipelineKey {
  std::string function;
  std::vector<std::pair<int, bool>> constants;  // (index, value)
  std::string key() const;
};

struct MetalKernelSpec {
  size_t args_size = 0;                     // bytes of the argument struct bound at buffer(0)
  int num_buffers = 0;                      // bound at 1 .. num_buffers
  std::vector<MetalPipelineKey> pipelines;  // every pipeline it may launch (all built when it is resolved)
  // For one launch's argument struct: which of `pipelines` runs, and its grid.
  std::pair<int, DispatchGeometry> (*plan)(const void* args) = nullptr;
  unsigned writes = 0;  // bit i: buffer i (bound at i + 1) is written (the op table's writes)
};

// The Metal backend's capabilities and limits (the attention kernels' thresholds and the shapes they take).
DeviceCaps metal_device_caps();

// Throws std::invalid_argument naming the kernels there are when `name` is none of them.
MetalKernelSpec metal_kernel_spec(const std::string& name);
std::vector<std::string> metal_kernel_names();

// The MSL source of every kernel, op_args.h inlined: what the backend compiles when no metallib is found
// (generated at build time from metal/*.metal).
extern const char* const kMetalKernelSource;

}  // namespace metal_engine
