// metal_engine._core.ops: run one kernel of any backend on numpy arrays (wrapped, not copied).
// This is what the op tests drive, so every backend is compared with the cpu reference op by op.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <cstring>
#include <optional>

#include <set>

#include "../../metal/op_args.h"
#include "../core/op_table.h"
#include "../metal/dispatch_geometry.h"
#include "../cpu/machine_probes.h"
#include "../cpu/blas.h"
#include "../cpu/counters.h"
#include "../cpu/quant_blocks.h"
#include "metal_engine/config.h"
#include "metal_engine/device.h"

namespace nb = nanobind;
using namespace metal_engine;

using AnyArray = nb::ndarray<nb::c_contig, nb::device::cpu>;

// cpu: the arrays themselves are the buffers. Other backends: device buffers, copied in before and out after
// (whole arrays, guard bands included, so an out-of-bounds write still shows); an array lying inside an earlier
// one (a view: k inside the q | k | v rows) is bound as that array's buffer at its offset, as the engine binds it.
template <class Args>
static void run_kernel(Device& d, const std::string& name, const Args& args,
                       const std::vector<std::optional<AnyArray>>& arrays) {
  if (arrays.size() < 2 || arrays.size() > 10)
    throw std::invalid_argument("kernels take 2 to 10 buffers, got " + std::to_string(arrays.size()));
  Kernel k = d.kernel(name);
  const bool copy = d.name() != "cpu";
  std::vector<std::unique_ptr<Buffer>> buffers;
  std::vector<size_t> owner(arrays.size(), SIZE_MAX);  // the array whose buffer holds array i (copy backends)
  BufferArg b[10] = {};
  for (size_t i = 0; i < arrays.size(); ++i) {
    const auto& a = arrays[i];
    if (!a) continue;
    const char* p = static_cast<const char*>(a->data());
    bool aliased = false;
    for (size_t j = 0; copy && j < i && !aliased; ++j) {
      if (!arrays[j] || owner[j] != j) continue;
      const char* q = static_cast<const char*>(arrays[j]->data());
      if (p >= q && p + a->nbytes() <= q + arrays[j]->nbytes()) {
        b[i] = BufferArg{b[j].buffer, size_t(p - q)};
        owner[i] = j;
        aliased = true;
      }
    }
    if (aliased) continue;
    owner[i] = i;
    if (copy) {
      buffers.push_back(d.allocate(a->nbytes(), "op test array " + std::to_string(i)));
      std::memcpy(buffers.back()->data(), a->data(), a->nbytes());
    } else {
      buffers.push_back(d.wrap(a->data(), a->nbytes(), "op test array"));
    }
    b[i] = BufferArg{buffers.back().get(), 0};
  }
  {
    nb::gil_scoped_release release;
    d.begin_step();
    try {  // the Device API takes an initializer_list
      switch (arrays.size()) {
        case 2: d.dispatch(k, args, {b[0], b[1]}); break;
        case 3: d.dispatch(k, args, {b[0], b[1], b[2]}); break;
        case 4: d.dispatch(k, args, {b[0], b[1], b[2], b[3]}); break;
        case 5: d.dispatch(k, args, {b[0], b[1], b[2], b[3], b[4]}); break;
        case 6: d.dispatch(k, args, {b[0], b[1], b[2], b[3], b[4], b[5]}); break;
        case 7: d.dispatch(k, args, {b[0], b[1], b[2], b[3], b[4], b[5], b[6]}); break;
        case 8: d.dispatch(k, args, {b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]}); break;
        case 9: d.dispatch(k, args, {b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8]}); break;
        default: d.dispatch(k, args, {b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9]}); break;
      }
      d.submit();
    } catch (...) {
      d.abandon_step();
      throw;
    }
    d.wait();
  }
  if (copy)
    for (size_t i = 0, j = 0; i < arrays.size(); ++i)
      if (arrays[i] && owner[i] == i) std::memcpy(arrays[i]->data(), buffers[j++]->data(), arrays[i]->nbytes());
}

template <class Args>
static void def_run(nb::module_& ops) {
  ops.def("run", &run_kernel<Args>, nb::arg("device"), nb::arg("kernel"), nb::arg("args"), nb::arg("buffers"));
}

void init_ops(nb::module_& m) {
  nb::class_<Device>(m, "Device")
      .def_prop_ro("name", &Device::name)
      .def("kernel_names", &Device::kernel_names);
  m.def(
      "create_device",
      [](const std::string& backend, int num_threads) {
        EngineConfig c;
        c.backend = backend;
        c.num_threads = num_threads;
        return create_device(c);
      },
      nb::arg("backend") = "cpu", nb::arg("num_threads") = 0);
  m.def("available_backends", &available_backends, "The backends this build has: cpu, and metal or metal-sim.");

  m.def("cpu_read_bandwidth_gbps", &cpu::measure_read_bandwidth, nb::arg("bytes") = size_t(1) << 30,
        nb::arg("num_threads") = 0, nb::arg("repeats") = 5, nb::call_guard<nb::gil_scoped_release>(),
        "Median read bandwidth (GB/s) of the cpu backend's threads streaming a large buffer.");
  m.def("cpu_fma_peak_gflops", &cpu::measure_fma_peak, nb::arg("num_threads") = 0, nb::arg("repeats") = 5,
        nb::arg("bits") = 0, nb::call_guard<nb::gil_scoped_release>(),
        "Median f32 FMA GFLOP/s of the cpu backend's threads running FMAs in registers, in bits-wide vectors "
        "(0: the widest the GEMM runs here, cpu_gemm()), at the clock they hold now.");
  m.def("cpu_gemm", &cpu::gemm_description, "The cpu backend's GEMM (matmul of 4+ rows) in this build.");
  m.def("cpu_gemm_bits", &cpu::gemm_vector_bits,
        "The cpu GEMM's choices here by vector width ([256, 512] with AVX-512, 512 being its packed panels from 256 "
        "rows: picked at start-up, METAL_ENGINE_CPU_GEMM_BITS forces it).");
  m.def("cpu_amx_choices", &cpu::amx_choices,
        "The cpu matmul's choices for many rows (quantized W from 6 rows, f16 / bf16 W from 48): [False, True] "
        "where this build and machine run them on AMX tiles (the default there; METAL_ENGINE_CPU_AMX=0 or 1 "
        "forces it), else [False].");
  m.def("cpu_amx", &cpu::amx_tiles, "Whether the cpu matmuls of many rows run on AMX tiles in this process.");
  m.def("cpu_quant_panels_choices", &cpu::quant_panels_choices,
        "The cpu quantized matmul's choices for 6+ rows where AMX does not run: [False, True] where this build has "
        "its int16 panels (AVX-512 VNNI; the default; METAL_ENGINE_CPU_QUANT_PANELS=0 dequantizes W for the float "
        "GEMM instead), else [False].");
  m.def("cpu_quant_panels", &cpu::quant_panels,
        "Whether the cpu quantized matmuls of 6+ rows run on int16 panels in this process (where AMX does not).");
  m.def("cpu_moe_expert_matmuls", &cpu::moe_expert_matmuls,
        "Expert weight matrices the cpu moe_matmul kernel has streamed since the process started.");
  m.def("cpu_blas", &cpu::blas_name, "The BLAS behind the cpu backend's prefill attention, or 'none'.");

  nb::module_ ops = m.def_submodule("ops", "kernel argument structs (metal/op_args.h) and ops.run");
  // every argument struct, its fields read-write, from ME_ARGS_STRUCTS (structs holding another, as the Metal
  // attention kernels' hold PagedAttentionArgs, come after it there)
#define F(field) c.def_rw(#field, &Args::field);
#define ME_BIND_ARGS(Args_, fields)     \
  {                                      \
    using Args = Args_;                  \
    nb::class_<Args> c(ops, #Args_);     \
    c.def(nb::init<>());                 \
    fields                               \
  }
  ME_ARGS_STRUCTS(ME_BIND_ARGS)
#undef ME_BIND_ARGS
#undef F
  ops.def("metal_matmul_kernel_prefix", [](const MatmulArgs& a) { return std::string(matmul_kernel_prefix(a)); },
          "Which Metal matmul kernel these arguments take: matmul_gemv or matmul_gemm.");
  // one ops.run overload per argument struct of the op table
  std::set<std::string> bound;
#define ME_DEF_RUN(op, Args, buffers, flavour, metal_only, quantized, writes) \
  if (bound.insert(#Args).second) def_run<Args>(ops);
  ME_OPS(ME_DEF_RUN)
#undef ME_DEF_RUN
  ops.def(
      "op_table",
      [] {
        std::vector<nb::dict> out;
        for (const OpInfo& op : op_table()) {
          nb::dict d;
          d["name"] = op.name;
          d["args"] = op.args_name;
          d["num_buffers"] = op.num_buffers;
          d["metal_only"] = op.metal_only;
          d["writes"] = op.writes;  // bit i: buffer i is written
          d["quantized"] = op.quantized;
          d["cpu_kernels"] = op.metal_only ? std::vector<std::string>{} : op_kernel_names(op, false, true);
          d["metal_kernels"] = op_kernel_names(op, true, true);
          out.push_back(d);
        }
        return out;
      },
      "Every op (src/core/op_table.h): its argument struct, buffer count and kernel names per backend.");
  ops.def(
      "quant_types",
      [] {
        std::vector<nb::dict> out;
        for (QuantType q : quant_types()) {
          const QuantInfo& i = quant_info(q);
          nb::dict d;
          d["name"] = i.name;
          d["block_elems"] = i.block_elems;
          d["block_bytes"] = i.block_bytes;
          d["ggml_type"] = i.ggml_type;
          out.push_back(d);
        }
        return out;
      },
      "The quantized weight formats (include/metal_engine/quant.h): name, weights and bytes per block, GGML type.");
  ops.def(
      "dequantize",
      [](const std::string& format, nb::ndarray<const uint8_t, nb::ndim<2>, nb::c_contig, nb::device::cpu> rows,
         int64_t cols) {
        const QuantType q = quant_from_string(format);
        if (int64_t(rows.shape(1)) != quant_row_bytes(q, cols))
          throw std::invalid_argument("dequantize: rows of " + std::to_string(rows.shape(1)) + " bytes are not " +
                                      std::to_string(cols) + " " + format + " weights");
        const int64_t n = int64_t(rows.shape(0));
        float* out = new float[size_t(n * cols)];
        nb::capsule owner(out, [](void* p) noexcept { delete[] static_cast<float*>(p); });
        for (int64_t r = 0; r < n; ++r)
          cpu::dequantize_row(q, rows.data() + r * rows.shape(1), out + r * cols, cols);
        return nb::ndarray<nb::numpy, float, nb::ndim<2>>(out, {size_t(n), size_t(cols)}, owner);
      },
      nb::arg("format"), nb::arg("rows"), nb::arg("cols"),
      "The cpu backend's dequantization: u8 [rows, row bytes] of `format` blocks -> f32 [rows, cols].");
}
