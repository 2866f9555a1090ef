// gather_rows: dst[r, :] = src[indices[r], :], one threadgroup per row.
#include <metal_stdlib>
#include "op_args.h"
using namespace metal;
using namespace metal_engine;

template <typename A>
kernel void gather_rows(constant GatherRowsArgs& args [[buffer(0)]],
                        device const A* src [[buffer(1)]],         // [*, dim]
                        device const int* indices [[buffer(2)]],   // [rows]
                        device A* dst [[buffer(3)]],               // [rows, dim]
                        uint r [[threadgroup_position_in_grid]],
                        uint tid [[thread_position_in_threadgroup]],
                        uint ntg [[threads_per_threadgroup]]) {
  for (int i = tid; i < args.dim; i += ntg) dst[long(r) * args.dim + i] = src[long(indices[r]) * args.dim + i];
}

template [[host_name("gather_rows")]] kernel decltype(gather_rows<float>) gather_rows<float>;
template [[host_name("gather_rows_act_f16")]] kernel decltype(gather_rows<half>) gather_rows<half>;
template [[host_name("gather_rows_act_bf16")]] kernel decltype(gather_rows<bfloat>) gather_rows<bfloat>;
