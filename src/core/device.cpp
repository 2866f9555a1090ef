// Backend selection: the cpu backend always; the Metal backend ("metal" on Apple, "metal-sim" on Linux
// against metal-sim's Metal stand-in) where this build has it (ME_METAL_BACKEND is its name).
#include "metal_engine/device.h"

#include <stdexcept>

#include "metal_engine/config.h"
#ifdef ME_METAL_BACKEND
#include "../metal/metal_device.h"
#endif

namespace metal_engine {

std::vector<std::string> available_backends() {
  std::vector<std::string> v{"cpu"};
#ifdef ME_METAL_BACKEND
  v.push_back(ME_METAL_BACKEND);
#endif
  return v;
}

std::unique_ptr<Device> create_device(const EngineConfig& config) {
  if (config.backend == "cpu") return create_cpu_device(config.num_threads);
#ifdef ME_METAL_BACKEND
  if (config.backend == ME_METAL_BACKEND) return create_metal_device(config);
#endif
  std::string all;
  for (const std::string& b : available_backends()) all += (all.empty() ? "'" : ", '") + b + "'";
  throw std::invalid_argument("unknown backend '" + config.backend + "': this build has " + all);
}

}  // namespace metal_engine
