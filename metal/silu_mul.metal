// The gated activations of the MLP, out = act(gate) * up, one thread per element:
// silu_mul (SwiGLU) and gelu_tanh_mul (GeGLU, Gemma).
#include <metal_stdlib>
#include "op_args.h"
using namespace metal;
using namespace metal_engine;

struct Silu {
  static float apply(float g) { return g / (1.0f + exp(-g)); }
};
struct GeluTanh {  // g/2 (1 + tanh(u)) = g - g / (1 + exp(2u)): no tanh overflow for large |u|
  static float apply(float g) {
    const float u = 0.7978845608028654f * (g + 0.044715f * g * g * g);
    return g - g / (1.0f + exp(2.0f * u));
  }
};

template <typename A, typename Act>
kernel void gated(constant SiluMulArgs& args [[buffer(0)]],
                  device const A* gate [[buffer(1)]],   // [rows, in_stride]
                  device const A* up [[buffer(2)]],     // [rows, in_stride]
                  device A* out [[buffer(3)]],          // [rows, dim]
                  uint i [[thread_position_in_grid]]) {
  if (i >= uint(args.rows * args.dim)) return;
  const uint j = (i / uint(args.dim)) * uint(args.in_stride) + i % uint(args.dim);
  out[i] = A(Act::apply(float(gate[j])) * float(up[j]));
}

template [[host_name("silu_mul")]] kernel decltype(gated<float, Silu>) gated<float, Silu>;
template [[host_name("silu_mul_act_f16")]] kernel decltype(gated<half, Silu>) gated<half, Silu>;
template [[host_name("silu_mul_act_bf16")]] kernel decltype(gated<bfloat, Silu>) gated<bfloat, Silu>;
template [[host_name("gelu_tanh_mul")]] kernel decltype(gated<float, GeluTanh>) gated<float, GeluTanh>;
template [[host_name("gelu_tanh_mul_act_f16")]] kernel decltype(gated<half, GeluTanh>) gated<half, GeluTanh>;
template [[host_name("gelu_tanh_mul_act_bf16")]] kernel decltype(gated<bfloat, GeluTanh>) gated<bfloat, GeluTanh>;
