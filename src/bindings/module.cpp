// metal_engine._core: one init_xxx per binding file (config, engine, ops).
#include <nanobind/nanobind.h>

namespace nb = nanobind;

void init_config(nb::module_& m);
void init_engine(nb::module_& m);
void init_ops(nb::module_& m);
#ifdef ME_HAVE_METAL_SIM
void init_metal_sim(nb::module_& m);
#endif

NB_MODULE(_core, m) {
  m.doc() = "metal_engine C++ core: devices, paged KV cache, scratch pool, kernels, engine";
  init_config(m);
  init_engine(m);
  init_ops(m);
#ifdef ME_HAVE_METAL_SIM
  init_metal_sim(m);
#endif
}
