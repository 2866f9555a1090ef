// Counters of the cpu backend's kernels, for tests that check what a step reads (no intrinsics here: the
// bindings include it).
#pragma once
#include <cstdint>

namespace metal_engine::cpu {

// Expert weight matrices moe_matmul has streamed since the process started (one per expert per call with
// rows): the tests check that a step reads only the routed experts.
int64_t moe_expert_matmuls();

}  // namespace metal_engine::cpu
