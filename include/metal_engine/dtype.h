// Element types of weights, KV cache and activations.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace metal_engine {

enum class DType : uint8_t { F32, F16, BF16, I32 };

size_t dtype_size(DType t);
// Short name used in kernel names: "f32", "f16", "bf16", "i32".
const char* dtype_name(DType t);
// Accepts torch/numpy/HF spellings: float32|fp32|f32, float16|half|fp16|f16, bfloat16|bf16.
// Throws std::invalid_argument naming the accepted spellings otherwise.
DType dtype_from_string(const std::string& s);

}  // namespace metal_engine
