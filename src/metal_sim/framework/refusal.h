// What metal-sim's Metal stand-in throws when it refuses a call a Metal device would refuse (or that our
// engine forbids): it propagates out of the metal-cpp call that made it.
#pragma once
#include <stdexcept>
#include <string>

namespace metal_sim {
struct Refusal : std::runtime_error {
  explicit Refusal(const std::string& what) : std::runtime_error(what) {}
};
}  // namespace metal_sim
