// softcap: out = cap * tanh(x / cap) (Gemma 2's final logits), one threadgroup per row.
#include <metal_stdlib>
#include "op_args.h"
using namespace metal;
using namespace metal_engine;

kernel void softcap(constant SoftcapArgs& args [[buffer(0)]],
                    device const float* x [[buffer(1)]],  // [rows, cols]
                    device float* out [[buffer(2)]],      // [rows, cols], may alias x
                    uint r [[threadgroup_position_in_grid]],
                    uint tid [[thread_position_in_threadgroup]],
                    uint ntg [[threads_per_threadgroup]]) {
  for (int i = tid; i < args.cols; i += ntg) {
    const long at = long(r) * args.cols + i;
    out[at] = args.cap * precise::tanh(x[at] / args.cap);
  }
}
