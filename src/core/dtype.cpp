#include "metal_engine/dtype.h"

#include <algorithm>
#include <cctype>
#include <stdexcept>

namespace metal_engine {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::F16: return 2;
    case DType::BF16: return 2;
    case DType::I32: return 4;
  }
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::F16: return "f16";
    case DType::BF16: return "bf16";
    case DType::I32: return "i32";
  }
  return "?";
}

DType dtype_from_string(const std::string& raw) {
  std::string s = raw;
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return char(std::tolower(c)); });
  if (s.rfind("torch.", 0) == 0) s = s.substr(6);
  if (s == "float32" || s == "fp32" || s == "f32" || s == "float") return DType::F32;
  if (s == "float16" || s == "fp16" || s == "f16" || s == "half") return DType::F16;
  if (s == "bfloat16" || s == "bf16") return DType::BF16;
  throw std::invalid_argument("unsupported dtype '" + raw +
                              "': use float32, float16 or bfloat16 (or 'auto' for the checkpoint's own)");
}

}  // namespace metal_engine
