// Kernels that exercise metal-sim's runtime itself (not product kernels): barriers, collectives, and
// the mistakes a GPU would punish.
#include <metal_stdlib>
using namespace metal;

// out[i] = in[(i + 1) % n] through threadgroup memory; correct only because of the barrier.
kernel void rotate_with_barrier(device const float* in [[buffer(0)]],
                                device float* out [[buffer(1)]],
                                uint i [[thread_position_in_threadgroup]],
                                uint n [[threads_per_threadgroup]]) {
  threadgroup float tile[1024];
  tile[i] = in[i];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[i] = tile[(i + 1) % n];
}

// The same without the barrier: a data race that the reverse thread order exposes.
kernel void rotate_without_barrier(device const float* in [[buffer(0)]],
                                   device float* out [[buffer(1)]],
                                   uint i [[thread_position_in_threadgroup]],
                                   uint n [[threads_per_threadgroup]]) {
  threadgroup float tile[1024];
  tile[i] = in[i];
  out[i] = tile[(i + 1) % n];
}

// Thread 0 leaves before the barrier the others wait at: hangs a GPU, an error here.
kernel void return_before_barrier(device float* out [[buffer(0)]],
                                  uint i [[thread_position_in_threadgroup]]) {
  if (i == 0) return;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[i] = 1.0f;
}

// Collectives: per-simdgroup sum, max, lane broadcast and butterfly shuffle.
kernel void collectives(device const float* in [[buffer(0)]],
                        device float* out [[buffer(1)]],
                        uint i [[thread_position_in_grid]],
                        uint lane [[thread_index_in_simdgroup]]) {
  const float x = in[i];
  out[4 * i + 0] = simd_sum(x);
  out[4 * i + 1] = simd_max(x);
  out[4 * i + 2] = simd_broadcast(x, ushort(3));
  out[4 * i + 3] = simd_shuffle_xor(x, ushort(1));
  (void)lane;
}

// 36 KB of threadgroup arrays: more than an Apple GPU's 32 KB, refused.
kernel void too_much_threadgroup_memory(device float* out [[buffer(0)]],
                                        uint i [[thread_position_in_threadgroup]]) {
  threadgroup float big[4096];
  threadgroup float more[5120];
  big[i] = 1.0f;
  more[i] = 2.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[i] = big[i] + more[i];
}
