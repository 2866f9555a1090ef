// The cpu backend's Device: host buffers, the kernel table, and a step's commands recorded at encode
// time and run in order at submit(), so the cpu and Metal backends share one step discipline.
#include <sys/mman.h>

#include <array>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>

#include "../core/op_table.h"
#include "cpu_kernels.h"
#include "gemm_panels.h"
#include "machine_probes.h"
#include "metal_engine/config.h"
#include "metal_engine/device.h"

namespace metal_engine {
namespace cpu {
namespace {

// Zero-filled host memory. Large buffers (KV cache, scratch pool) are anonymous mappings: the kernel
// hands out zero pages lazily, so only the pages a workload touches become resident.
class HostBuffer : public Buffer {
 public:
  static constexpr size_t kMapThreshold = size_t(1) << 20;

  HostBuffer(size_t bytes, const std::string& label) : size_(bytes) {
    (void)label;
    if (bytes >= kMapThreshold) {
      void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) throw std::bad_alloc();
      data_ = p;
      mapped_ = true;
    } else if (bytes) {
      data_ = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
      if (!data_) throw std::bad_alloc();
      std::memset(data_, 0, bytes);
    }
  }
  ~HostBuffer() override {
    if (mapped_) ::munmap(data_, size_);
    else std::free(data_);
  }
  void* data() override { return data_; }
  size_t size() const override { return size_; }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
  bool mapped_ = false;
};

class WrappedBuffer : public Buffer {
 public:
  WrappedBuffer(void* p, size_t n) : data_(p), size_(n) {}
  void* data() override { return data_; }
  size_t size() const override { return size_; }

 private:
  void* data_;
  size_t size_;
};

// A recorded command holds any op's argument struct and buffers (src/core/op_table.h).
constexpr int kMaxBuffers = max_op_buffers();
constexpr size_t kMaxArgs = max_op_args_size();

struct Command {
  int kernel = -1;
  std::array<unsigned char, kMaxArgs> args{};
  std::array<void*, kMaxBuffers> buffers{};
};

class CpuDevice : public Device {
 public:
  explicit CpuDevice(int num_threads) : pool_(num_threads) {
    gemm_wide_vectors();  // chosen (or a bad METAL_ENGINE_CPU_GEMM_BITS refused) here, not in a first step's GEMM
    amx_tiles();     // likewise METAL_ENGINE_CPU_AMX
    quant_panels();  // and METAL_ENGINE_CPU_QUANT_PANELS
    add_embedding_kernels(table_);
    add_rms_norm_kernels(table_);
    add_matmul_kernels(table_);
    add_quant_matmul_kernels(table_);
    add_rope_kernels(table_);
    add_silu_mul_kernels(table_);
    add_qk_norm_kernels(table_);
    add_moe_kernels(table_);
    add_kv_write_kernels(table_);
    add_paged_attention_kernels(table_);
    add_gather_rows_kernels(table_);
    add_argmax_kernels(table_);
    add_feed_tokens_kernels(table_);
    add_softcap_kernels(table_);
    check_against_op_table();
  }

  // Every kernel is an op of the op table with that op's argument struct and buffer count, and every op the cpu
  // backend runs has all its kernels: a mismatch is a build mistake, reported when the device is made.
  void check_against_op_table() const {
    for (const KernelDef& k : table_) {
      const OpInfo* op = op_of_kernel(k.name);
      if (!op) throw std::logic_error("cpu kernel '" + k.name + "' is no op of src/core/op_table.h");
      if (op->args_size != k.args_size || op->num_buffers != k.num_buffers)
        throw std::logic_error("cpu kernel '" + k.name + "' takes " + std::to_string(k.args_size) + " argument bytes and " +
                               std::to_string(k.num_buffers) + " buffers; op_table.h says " + op->args_name + " (" +
                               std::to_string(op->args_size) + " bytes) and " + std::to_string(op->num_buffers));
    }
    for (const OpInfo& op : op_table()) {
      if (op.metal_only) continue;
      for (const std::string& name : op_kernel_names(op, false, /*with_quantized=*/true)) {
        bool found = false;
        for (const KernelDef& k : table_) found |= k.name == name;
        if (!found) throw std::logic_error("the cpu backend lacks kernel '" + name + "' of op " + op.name);
      }
    }
  }

  std::string name() const override { return "cpu"; }
  DeviceCaps caps() const override { return DeviceCaps{}; }  // one attention kernel for every row; no limits

  std::unique_ptr<Buffer> allocate(size_t bytes, const std::string& label) override {
    return std::make_unique<HostBuffer>(bytes, label);
  }
  std::unique_ptr<Buffer> wrap(void* p, size_t bytes, const std::string&) override {
    return std::make_unique<WrappedBuffer>(p, bytes);
  }

  Kernel kernel(const std::string& name) override {
    for (size_t i = 0; i < table_.size(); ++i)
      if (table_[i].name == name) return Kernel{int(i), name};
    std::string all;
    for (const auto& k : table_) all += (all.empty() ? "" : ", ") + k.name;
    throw std::invalid_argument("the cpu backend has no kernel '" + name + "' (it has: " + all + ")");
  }
  std::vector<std::string> kernel_names() const override {
    std::vector<std::string> v;
    for (const auto& k : table_) v.push_back(k.name);
    return v;
  }

  void begin_step() override {
    commands_.clear();
    encoding_ = true;
  }

  void dispatch(const Kernel& k, const void* args, size_t args_size,
                std::initializer_list<BufferArg> buffers) override {
    if (!encoding_) throw std::logic_error("dispatch of '" + k.name + "' outside begin_step()/submit()");
    if (k.index < 0 || size_t(k.index) >= table_.size()) throw std::invalid_argument("unknown kernel handle");
    const KernelDef& def = table_[size_t(k.index)];
    if (args_size > kMaxArgs || buffers.size() > size_t(kMaxBuffers) || args_size != def.args_size ||
        int(buffers.size()) != def.num_buffers)
      throw std::invalid_argument("kernel '" + def.name + "' takes " + std::to_string(def.args_size) +
                                  " argument bytes and " + std::to_string(def.num_buffers) + " buffers, got " +
                                  std::to_string(args_size) + " and " + std::to_string(buffers.size()));
    Command c;
    c.kernel = k.index;
    std::memcpy(c.args.data(), args, args_size);
    int i = 0;
    for (const BufferArg& b : buffers)
      c.buffers[size_t(i++)] = b.buffer ? static_cast<char*>(b.buffer->data()) + b.offset : nullptr;
    commands_.push_back(c);
  }

  void submit() override {
    if (!encoding_) throw std::logic_error("submit() without begin_step()");
    encoding_ = false;
    for (const Command& c : commands_) {
      const KernelDef& def = table_[size_t(c.kernel)];
      if (!profiling_) {
        def.run(c.args.data(), c.buffers.data(), pool_);
        continue;
      }
      const auto t0 = std::chrono::steady_clock::now();
      def.run(c.args.data(), c.buffers.data(), pool_);
      KernelTime& kt = profile_[def.name];
      kt.calls += 1;
      kt.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    commands_.clear();
  }

  void set_profiling(bool on) override { profiling_ = on; }
  std::map<std::string, KernelTime> take_profile() override {
    std::map<std::string, KernelTime> out;
    out.swap(profile_);
    return out;
  }

  void wait() override {
    if (encoding_) throw std::logic_error("wait() inside a step's encode phase: submit() first");
  }

  void abandon_step() override {
    commands_.clear();
    encoding_ = false;
  }

 private:
  ThreadPool pool_;
  std::vector<KernelDef> table_;
  std::vector<Command> commands_;
  bool encoding_ = false;
  bool profiling_ = false;
  std::map<std::string, KernelTime> profile_;
};

}  // namespace
}  // namespace cpu

std::unique_ptr<Device> create_cpu_device(int num_threads) { return std::make_unique<cpu::CpuDevice>(num_threads); }

}  // namespace metal_engine
