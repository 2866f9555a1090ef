// gather_rows: dst[r, :] = src[indices[r], :]
#include <cstring>

#include "../cpu_kernels.h"

namespace metal_engine::cpu {

static void gather_rows(const GatherRowsArgs& a, void* const* b, ThreadPool&) {
  const float* src = static_cast<const float*>(b[0]);
  const int32_t* idx = static_cast<const int32_t*>(b[1]);
  float* dst = static_cast<float*>(b[2]);
  for (int r = 0; r < a.rows; ++r)
    std::memcpy(dst + int64_t(r) * a.dim, src + int64_t(idx[r]) * a.dim, sizeof(float) * size_t(a.dim));
}

void add_gather_rows_kernels(std::vector<KernelDef>& table) {
  table.push_back(make_kernel<GatherRowsArgs>("gather_rows", 3, gather_rows));
}

}  // namespace metal_engine::cpu
