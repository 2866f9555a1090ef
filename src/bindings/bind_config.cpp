#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "metal_engine/config.h"
#include "metal_engine/scratch_pool.h"

namespace nb = nanobind;
using namespace metal_engine;

void init_config(nb::module_& m) {
  nb::exception<ScratchPoolExhausted>(m, "ScratchPoolExhausted", PyExc_MemoryError);

  nb::class_<EngineConfig>(m, "EngineConfig")
      .def(nb::init<>())
      .def_rw("backend", &EngineConfig::backend)
      .def_rw("dtype", &EngineConfig::dtype)
      .def_rw("activation_dtype", &EngineConfig::activation_dtype)
      .def_rw("kv_cache_dtype", &EngineConfig::kv_cache_dtype)
      .def_rw("block_size", &EngineConfig::block_size)
      .def_rw("kv_cache_memory", &EngineConfig::kv_cache_memory)
      .def_rw("num_kv_blocks", &EngineConfig::num_kv_blocks)
      .def_rw("scratch_pool_mb", &EngineConfig::scratch_pool_mb)
      .def_rw("num_threads", &EngineConfig::num_threads)
      .def("apply_env", &EngineConfig::apply_env);

  nb::class_<ModelConfig>(m, "ModelConfig")
      .def_static("from_json", &ModelConfig::from_json, nb::arg("text"), nb::arg("source") = "config.json")
      .def_ro("architecture", &ModelConfig::architecture)
      .def_ro("vocab_size", &ModelConfig::vocab_size)
      .def_ro("hidden_size", &ModelConfig::hidden_size)
      .def_ro("intermediate_size", &ModelConfig::intermediate_size)
      .def_ro("num_layers", &ModelConfig::num_layers)
      .def_ro("num_heads", &ModelConfig::num_heads)
      .def_ro("num_kv_heads", &ModelConfig::num_kv_heads)
      .def_ro("head_dim", &ModelConfig::head_dim)
      .def_ro("max_position_embeddings", &ModelConfig::max_position_embeddings)
      .def_ro("rms_norm_eps", &ModelConfig::rms_norm_eps)
      .def_ro("rope_theta", &ModelConfig::rope_theta)
      .def_ro("tie_word_embeddings", &ModelConfig::tie_word_embeddings)
      .def_ro("sliding_window", &ModelConfig::sliding_window)
      .def_ro("layer_uses_sliding_window", &ModelConfig::layer_uses_sliding_window)
      .def_prop_ro("uniform_sliding_window", &ModelConfig::uniform_sliding_window,
                   "The window when every layer slides over it, else 0.");
}
