// The backend-neutral device interface. A backend owns buffers and kernels (looked up by name once,
// at load time) and runs one encode / submit / wait cycle per engine step:
//
//   dev.begin_step();  dev.dispatch(k1, args, {...});  dev.dispatch(k2, ...);  dev.submit();  dev.wait();
//
// Steps may be in flight together: begin_step() may follow submit() before the wait() (the next step encoded while
// the device runs this one); submitted steps run in submission order, each after the one before it, and wait()
// waits for the oldest submitted step not yet waited for. Nothing may read or write a buffer a submitted step
// binds until that step's wait().
#pragma once
#include <cstddef>
#include <initializer_list>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace metal_engine {

struct EngineConfig;

class Buffer {
 public:
  virtual ~Buffer() = default;
  virtual void* data() = 0;  // host-visible (cpu memory, or Metal shared storage)
  virtual size_t size() const = 0;
};

// A buffer binding: a buffer and a byte offset into it. A null buffer binds nothing (optional input).
struct BufferArg {
  Buffer* buffer = nullptr;
  size_t offset = 0;
  size_t bytes = 0;  // how far the binding reaches from offset (a scratch tensor's size); 0: to the buffer's end
};

// Handle of a kernel resolved by Device::kernel(); cheap to copy and to dispatch.
struct Kernel {
  int index = -1;
  std::string name;
};

// What a backend can run beyond the kernels every backend has, and its limits: typed, so the engine plans a
// step and checks a model at load without reading kernel names.
struct DeviceCaps {
  bool half_activations = false;     // <op>_<wdt>_act_<wdt> kernels: activations in the weights' 16-bit type
  bool fused_decode_attention = false;  // paged_attention_decode_*: KV write + attention, one new token a row
  int prefill_attention_min_rows = 0;   // > 0: chunks this long take the tiled paged_attention_prefill_*
  int prefill_attention_head_dim_multiple = 1;  // ... when head_dim is a multiple of this
  int prefill_attention_max_head_dim = 0;       // ... and at most this (0: any); else they take paged_attention_*
  int split_attention_keys = 0;         // > 0: contexts longer take paged_attention_split_* in parts this long
  int max_attention_head_dim = 0;       // 0: any
  int max_query_heads_per_kv_head = 0;  // 0: any
  int max_attention_group_dims = 0;     // query heads per KV head x head_dim at most this (0: any)
};

class Device {
 public:
  virtual ~Device() = default;
  virtual std::string name() const = 0;
  // What the device is, for people: its hardware and, on Metal, where its kernels came from.
  virtual std::string description() const { return name(); }
  virtual DeviceCaps caps() const = 0;

  virtual std::unique_ptr<Buffer> allocate(size_t bytes, const std::string& label) = 0;
  // Wraps existing host memory (e.g. an mmap'ed checkpoint) without copying; memory must outlive it.
  virtual std::unique_ptr<Buffer> wrap(void* host_ptr, size_t bytes, const std::string& label) = 0;

  // Looks a kernel up by name; throws std::invalid_argument if this backend has none of that name.
  virtual Kernel kernel(const std::string& name) = 0;
  virtual std::vector<std::string> kernel_names() const = 0;

  virtual void begin_step() = 0;
  // Encodes one kernel launch: `args` is the kernel's argument struct (metal/op_args.h), bound at
  // buffer(0) on Metal; buffers bind at 1, 2, ... in order.
  virtual void dispatch(const Kernel& k, const void* args, size_t args_size,
                        std::initializer_list<BufferArg> buffers) = 0;
  virtual void submit() = 0;
  virtual void wait() = 0;  // the oldest submitted step not yet waited for (none: returns at once)
  // Drops a step whose encoding failed (nothing of it runs), so the next begin_step() starts clean.
  virtual void abandon_step() = 0;

  // Per-kernel timing of submitted steps, for profiling ("where does a step's time go"). Backends
  // that cannot time kernels leave the map empty.
  struct KernelTime {
    long calls = 0;
    double seconds = 0.0;
  };
  virtual void set_profiling(bool on) { (void)on; }
  virtual std::map<std::string, KernelTime> take_profile() { return {}; }

  template <class Args>
  void dispatch(const Kernel& k, const Args& args, std::initializer_list<BufferArg> buffers) {
    dispatch(k, &args, sizeof(Args), buffers);
  }
};

// The device of config.backend: "cpu", and "metal" (Apple) or "metal-sim" (Linux) where this build has the
// Metal backend; throws std::invalid_argument naming the available backends otherwise.
std::unique_ptr<Device> create_device(const EngineConfig& config);
std::vector<std::string> available_backends();
std::unique_ptr<Device> create_cpu_device(int num_threads);

}  // namespace metal_engine
