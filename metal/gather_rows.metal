// gather_rows: dst[r, :] = src[indices[r], :], one threadgroup per row.
#include <metal_stdlib>
#include "op_args.h"
using namespace metal;
using namespace metal_engine;

kernel void gather_rows(constant GatherRowsArgs& args [[buffer(0)]],
                        device const float* src [[buffer(1)]],     // [*, dim]
                        device const int* indices [[buffer(2)]],   // [rows]
                        device float* dst [[buffer(3)]],           // [rows, dim]
                        uint r [[threadgroup_position_in_grid]],
                        uint tid [[thread_position_in_threadgroup]],
                        uint ntg [[threads_per_threadgroup]]) {
  for (int i = tid; i < args.dim; i += ntg) dst[long(r) * args.dim + i] = src[long(indices[r]) * args.dim + i];
}
