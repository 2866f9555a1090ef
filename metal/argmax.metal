// argmax: out[r] = the first index of the largest value of row r, one threadgroup per row: every thread
// scans a strided share, then simd_max / threadgroup merges find the largest value and simd_min the first
// index holding it. Greedy decoding reads back one int per sequence instead of the logits.
#include <metal_stdlib>
#include "op_args.h"
using namespace metal;
using namespace metal_engine;

kernel void argmax(constant ArgmaxArgs& args [[buffer(0)]],
                   device const float* logits [[buffer(1)]],  // [rows, vocab]
                   device int* out [[buffer(2)]],             // [rows]
                   uint row [[threadgroup_position_in_grid]],
                   uint tid [[thread_position_in_threadgroup]],
                   uint ntg [[threads_per_threadgroup]],
                   uint lane [[thread_index_in_simdgroup]],
                   uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float best_val[32];
  threadgroup int best_idx[32];
  device const float* x = logits + long(row) * args.vocab;
  float v = -INFINITY;
  int idx = args.vocab;  // "none": larger than any index
  for (int i = int(tid); i < args.vocab; i += int(ntg))
    if (x[i] > v) {  // strictly greater: each thread keeps its first maximum
      v = x[i];
      idx = i;
    }
  const float sv = simd_max(v);
  const int si = simd_min(v == sv ? idx : args.vocab);
  if (lane == 0) {
    best_val[sg] = sv;
    best_idx[sg] = si;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg == 0) {
    const int groups = int(ntg + 31) / 32;
    const float gv = int(lane) < groups ? best_val[lane] : -INFINITY;
    const int gi = int(lane) < groups ? best_idx[lane] : args.vocab;
    const float mv = simd_max(gv);
    const int mi = simd_min(gv == mv ? gi : args.vocab);
    if (lane == 0) out[row] = mi;
  }
}
