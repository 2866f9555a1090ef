// silu_mul: out = silu(gate) * up, one thread per element.
#include <metal_stdlib>
#include "op_args.h"
using namespace metal;
using namespace metal_engine;

template <typename A>
kernel void silu_mul(constant SiluMulArgs& args [[buffer(0)]],
                     device const A* gate [[buffer(1)]],   // [rows, in_stride]
                     device const A* up [[buffer(2)]],     // [rows, in_stride]
                     device A* out [[buffer(3)]],          // [rows, dim]
                     uint i [[thread_position_in_grid]]) {
  if (i >= uint(args.rows * args.dim)) return;
  const uint j = (i / uint(args.dim)) * uint(args.in_stride) + i % uint(args.dim);
  const float g = float(gate[j]);
  out[i] = A(g / (1.0f + exp(-g)) * float(up[j]));
}

template [[host_name("silu_mul")]] kernel decltype(silu_mul<float>) silu_mul<float>;
template [[host_name("silu_mul_act_f16")]] kernel decltype(silu_mul<half>) silu_mul<half>;
template [[host_name("silu_mul_act_bf16")]] kernel decltype(silu_mul<bfloat>) silu_mul<bfloat>;
