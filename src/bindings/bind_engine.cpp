#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/unique_ptr.h>

#include <algorithm>

#include "metal_engine/engine.h"
#include "metal_engine/sampler.h"

namespace nb = nanobind;
using namespace metal_engine;

template <class T>
using Vec = nb::ndarray<const T, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

template <class T>
static std::vector<T> to_vector(const Vec<T>& a) {
  return std::vector<T>(a.data(), a.data() + a.shape(0));
}

using Table = nb::ndarray<const int32_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

// A new numpy array of `shape` that fill(data) writes with the GIL released (while the engine steps).
template <class T, size_t D, class F>
static nb::ndarray<nb::numpy, T, nb::ndim<D>> filled_array(const size_t (&shape)[D], F&& fill) {
  size_t n = 1;
  for (size_t d : shape) n *= d;
  T* data = new T[std::max<size_t>(n, 1)];
  nb::capsule owner(data, [](void* p) noexcept { delete[] static_cast<T*>(p); });
  {
    nb::gil_scoped_release release;
    fill(data);
  }
  return nb::ndarray<nb::numpy, T, nb::ndim<D>>(data, D, shape, owner);
}

static StepInput step_input(const Vec<int32_t>& token_ids, const Vec<int32_t>& positions,
                            const Vec<int32_t>& query_start_loc, const Vec<int32_t>& seq_lens, const Table& block_tables,
                            const Vec<int64_t>& slot_mapping, const Vec<int32_t>& logits_indices) {
  StepInput in;
  in.token_ids = to_vector(token_ids);
  in.positions = to_vector(positions);
  in.query_start_loc = to_vector(query_start_loc);
  in.seq_lens = to_vector(seq_lens);
  in.block_table_width = int32_t(block_tables.shape(1));
  in.block_tables.assign(block_tables.data(), block_tables.data() + block_tables.size());
  in.slot_mapping = to_vector(slot_mapping);
  in.logits_indices = to_vector(logits_indices);
  return in;
}

void init_engine(nb::module_& m) {
  m.def(
      "sample_rows",
      [](nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu> logits, Vec<float> temperature,
         Vec<int32_t> top_k, Vec<float> top_p, Vec<float> min_p, Vec<double> u) {
        const size_t R = logits.shape(0), V = logits.shape(1);
        if (temperature.shape(0) != R || top_k.shape(0) != R || top_p.shape(0) != R || min_p.shape(0) != R ||
            u.shape(0) != R)
          throw std::invalid_argument("sample_rows: temperature, top_k, top_p, min_p and u need one value per row");
        for (size_t r = 0; r < R; ++r)
          if (!(temperature.data()[r] > 0.0f))
            throw std::invalid_argument("sample_rows: temperatures must be > 0 (greedy rows take the argmax)");
        return filled_array<int64_t>({R}, [&](int64_t* out) {
          sample_rows(logits.data(), int64_t(R), int64_t(V), temperature.data(), top_k.data(), top_p.data(),
                      min_p.data(), u.data(), out);
        });
      },
      nb::arg("logits"), nb::arg("temperature"), nb::arg("top_k"), nb::arg("top_p"), nb::arg("min_p"), nb::arg("u"),
      "Tokens [rows]: each row of logits f32 [rows, vocab] sampled at its temperature with its top_k / top_p / "
      "min_p and uniform draw u (include/metal_engine/sampler.h).");
  nb::class_<Engine>(m, "Engine")
      .def_static("from_checkpoint", &Engine::from_checkpoint, nb::arg("path"), nb::arg("config") = EngineConfig{},
                  nb::call_guard<nb::gil_scoped_release>())
      .def_prop_ro("model_config", &Engine::model_config, nb::rv_policy::reference_internal)
      .def_prop_ro("engine_config", &Engine::engine_config, nb::rv_policy::reference_internal)
      .def_prop_ro("dtype", [](const Engine& e) { return std::string(dtype_name(e.dtype())); })
      .def_prop_ro("activation_dtype", [](const Engine& e) { return std::string(dtype_name(e.activation_dtype())); })
      .def_prop_ro("kv_cache_dtype", [](const Engine& e) { return std::string(dtype_name(e.kv_cache_dtype())); })
      .def_prop_ro("backend", [](Engine& e) { return e.device().name(); })
      .def_prop_ro("device_description", [](Engine& e) { return e.device().description(); },
                   "The device, and on Metal where its kernels came from (a metallib's path, or the embedded MSL source).")
      .def_prop_ro("num_kv_blocks", [](Engine& e) { return e.kv_cache().num_blocks(); })
      .def_prop_ro("block_size", [](Engine& e) { return e.kv_cache().block_size(); })
      .def_prop_ro("kv_cache_bytes", [](Engine& e) { return e.kv_cache().total_bytes(); })
      .def_prop_ro("scratch_pool_bytes", [](Engine& e) { return e.scratch_pool().capacity(); })
      .def_prop_ro("scratch_high_water_bytes", [](Engine& e) { return e.scratch_pool().high_water_mark(); })
      .def("set_profiling", [](Engine& e, bool on) { e.device().set_profiling(on); }, nb::arg("on"),
           "Time every kernel of the following steps (cpu backend).")
      .def(
          "take_profile",
          [](Engine& e) {
            std::map<std::string, std::pair<long, double>> out;
            for (const auto& kv : e.device().take_profile()) out[kv.first] = {kv.second.calls, kv.second.seconds};
            return out;
          },
          "{kernel: (calls, seconds)} since profiling started or the last take_profile().")
      .def(
          "step",
          [](Engine& e, Vec<int32_t> token_ids, Vec<int32_t> positions, Vec<int32_t> query_start_loc,
             Vec<int32_t> seq_lens, Table block_tables, Vec<int64_t> slot_mapping, Vec<int32_t> logits_indices) {
            const StepInput in = step_input(token_ids, positions, query_start_loc, seq_lens, block_tables,
                                            slot_mapping, logits_indices);
            const size_t shape[2] = {in.logits_indices.size(), size_t(e.model_config().vocab_size)};
            return filled_array<float>(shape, [&](float* out) { e.step(in, out); });
          },
          nb::arg("token_ids"), nb::arg("positions"), nb::arg("query_start_loc"), nb::arg("seq_lens"),
          nb::arg("block_tables"), nb::arg("slot_mapping"), nb::arg("logits_indices"),
          "One forward over a flattened batch; returns fp32 logits [len(logits_indices), vocab].")
      .def(
          "step_greedy",
          [](Engine& e, Vec<int32_t> token_ids, Vec<int32_t> positions, Vec<int32_t> query_start_loc,
             Vec<int32_t> seq_lens, Table block_tables, Vec<int64_t> slot_mapping, Vec<int32_t> logits_indices) {
            const StepInput in = step_input(token_ids, positions, query_start_loc, seq_lens, block_tables,
                                            slot_mapping, logits_indices);
            const size_t shape[1] = {in.logits_indices.size()};
            return filled_array<int32_t>(shape, [&](int32_t* out) { e.step_greedy(in, out); });
          },
          nb::arg("token_ids"), nb::arg("positions"), nb::arg("query_start_loc"), nb::arg("seq_lens"),
          nb::arg("block_tables"), nb::arg("slot_mapping"), nb::arg("logits_indices"),
          "The same forward; returns each requested row's greedy token (argmax on the device), int32 [rows].")
      .def(
          "submit",
          [](Engine& e, Vec<int32_t> token_ids, Vec<int32_t> positions, Vec<int32_t> query_start_loc,
             Vec<int32_t> seq_lens, Table block_tables, Vec<int64_t> slot_mapping, Vec<int32_t> logits_indices,
             bool greedy, std::optional<Vec<int32_t>> prev_token_rows) {
            StepInput in = step_input(token_ids, positions, query_start_loc, seq_lens, block_tables, slot_mapping,
                                      logits_indices);
            if (prev_token_rows) in.prev_token_rows = to_vector(*prev_token_rows);
            nb::gil_scoped_release release;
            return e.submit(in, greedy);
          },
          nb::arg("token_ids"), nb::arg("positions"), nb::arg("query_start_loc"), nb::arg("seq_lens"),
          nb::arg("block_tables"), nb::arg("slot_mapping"), nb::arg("logits_indices"), nb::arg("greedy") = false,
          nb::arg("prev_token_rows") = nb::none(),
          "Encodes and submits a step without waiting; returns its ticket for collect(). prev_token_rows [num_tokens]: "
          "rows >= 0 take that greedy token of the step submitted just before (a greedy submit), on the device.")
      .def(
          "collect",
          [](Engine& e, uint64_t ticket) -> nb::object {
            const size_t rows = e.result_rows(ticket);
            if (e.result_is_greedy(ticket)) {
              const size_t shape[1] = {rows};
              return nb::cast(filled_array<int32_t>(shape, [&](int32_t* out) { e.collect(ticket, out); }));
            }
            const size_t shape[2] = {rows, size_t(e.model_config().vocab_size)};
            return nb::cast(filled_array<float>(shape, [&](float* out) { e.collect(ticket, out); }));
          },
          nb::arg("ticket"),
          "Waits for the oldest submitted step (`ticket`) and returns its logits f32 [rows, vocab], or its greedy "
          "tokens int32 [rows] if it was submitted greedy.")
      .def_prop_ro("steps_in_flight", &Engine::steps_in_flight, "Steps submitted and not yet collected.");
}
