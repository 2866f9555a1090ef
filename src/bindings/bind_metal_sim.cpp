// metal_engine._core.metal_sim: run one .metal kernel on metal-sim's CPU emulator, on numpy arrays, with the
// same argument structs and dispatch geometry as the Metal backend. The kernel tests compare it with the
// cpu backend's op.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <optional>
#include <set>
#include <stdexcept>

#include "../core/op_table.h"
#include "../metal/dispatch_geometry.h"
#include "../metal/metal_kernels.h"
#include "../metal_sim/runtime.h"

namespace nb = nanobind;
using namespace metal_engine;

using AnyArray = nb::ndarray<nb::c_contig, nb::device::cpu>;

template <class Args>
static void run_sim(const std::string& name, const Args& args, const std::vector<std::optional<AnyArray>>& arrays,
                    bool reverse) {
  if (arrays.size() > 15) throw std::invalid_argument("at most 15 buffers");
  void* ptrs[16] = {};
  ptrs[0] = const_cast<Args*>(&args);  // the argument struct at buffer(0), as setBytes binds it
  for (size_t i = 0; i < arrays.size(); ++i) ptrs[i + 1] = arrays[i] ? arrays[i]->data() : nullptr;
  metal_sim::link_engine_kernels();
  // the grid and function constants the Metal backend would use for this MSL function and these arguments
  const MetalKernelSpec spec = metal_kernel_spec(name);
  const auto plan = spec.plan(&args);
  const DispatchGeometry& g = plan.second;
  metal_sim::DispatchOptions opt;
  opt.reverse_order = reverse;
  for (const auto& c : spec.pipelines[size_t(plan.first)].constants)
    opt.constants.push_back(metal_sim::FunctionConstant{c.first, {static_cast<unsigned char>(c.second)}});
  nb::gil_scoped_release release;
  // the MSL function the plan picks (a backend-neutral name such as matmul_f32 runs matmul_gemv_f32 or _gemm_)
  const std::string function = spec.pipelines[size_t(plan.first)].function;
  metal_sim::dispatch(function, ptrs, {g.groups[0], g.groups[1], g.groups[2]}, {g.threads[0], g.threads[1], g.threads[2]},
                      opt);
}

template <class Args>
static void def_run(nb::module_& m) {
  m.def("run", &run_sim<Args>, nb::arg("kernel"), nb::arg("args"), nb::arg("buffers"), nb::arg("reverse") = false);
}

void init_metal_sim(nb::module_& m) {
  nb::module_ sim = m.def_submodule("metal_sim", "metal-sim's kernel emulator: the .metal kernels run on the CPU");
  sim.def("kernel_names", [] {
    metal_sim::link_engine_kernels();
    return metal_sim::kernel_names();
  });
  std::set<std::string> bound;  // one run overload per argument struct of the op table
#define ME_DEF_RUN(op, Args, buffers, flavour, metal_only, quantized, writes) \
  if (bound.insert(#Args).second) def_run<Args>(sim);
  ME_OPS(ME_DEF_RUN)
#undef ME_DEF_RUN
}
