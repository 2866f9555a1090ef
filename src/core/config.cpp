#include "metal_engine/config.h"

#include <cerrno>
#include <cstdlib>
#include <stdexcept>

#include "../models/model.h"

namespace metal_engine {

void EngineConfig::apply_env() {
  if (const char* v = std::getenv("VLLM_METAL_SCRATCH_POOL_MB")) {
    char* end = nullptr;
    errno = 0;
    long long mb = std::strtoll(v, &end, 10);
    if (end == v || *end != '\0' || errno != 0 || mb <= 0)
      throw std::invalid_argument(std::string("VLLM_METAL_SCRATCH_POOL_MB='") + v +
                                  "' is not a positive whole number of MiB (e.g. 512)");
    scratch_pool_mb = size_t(mb);
  }
}

DType resolve_dtype(const std::string& dtype, DType checkpoint) {
  if (dtype != "auto") return dtype_from_string(dtype);
  return checkpoint == DType::BF16 ? DType::BF16 : DType::F16;
}

ModelConfig ModelConfig::from_json(const std::string& text, const std::string& source) {
  return models::read_model(text, source).first;
}

}  // namespace metal_engine
