// silu_mul: out = silu(gate) * up, one thread per element.
#include <metal_stdlib>
#include "op_args.h"
using namespace metal;
using namespace metal_engine;

kernel void silu_mul(constant SiluMulArgs& args [[buffer(0)]],
                     device const float* gate [[buffer(1)]],   // [rows, dim]
                     device const float* up [[buffer(2)]],     // [rows, dim]
                     device float* out [[buffer(3)]],          // [rows, dim]
                     uint i [[thread_position_in_grid]]) {
  if (i >= uint(args.rows * args.dim)) return;
  const float g = gate[i];
  out[i] = g / (1.0f + exp(-g)) * up[i];
}
