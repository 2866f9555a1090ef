// The Metal backend's entry point (metal_device.cpp, compiled against metal-cpp): "metal" on Apple,
// "metal-sim" on Linux against metal-sim's stand-in for the Metal framework.
#pragma once
#include <memory>

#include "metal_engine/device.h"

namespace metal_engine {
std::unique_ptr<Device> create_metal_device(const EngineConfig& config);
}  // namespace metal_engine
