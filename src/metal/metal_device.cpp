// The Metal backend, written once against metal-cpp: on a Mac against Apple's Metal ("metal"), on Linux
// against metal-sim's stand-in for the Metal framework ("metal-sim"). The same calls, kernels, grids and
// bindings run in both places.
//
// A step is one command buffer with one compute encoder (concurrent dispatch type, a buffer memory barrier only
// before a dispatch that depends on an earlier one): begin_step() opens them, dispatch() encodes, submit() ends the
// encoder and commits, wait() waits for the oldest committed step. Steps may be in flight together: one queue runs
// its command buffers in commit order, and every buffer is a tracked resource (the default hazard tracking), so
// Metal orders a step's reads of what the step before it wrote (the KV cache, the greedy tokens it feeds on). Buffers are MTLBuffers in shared storage
// (the host writes step inputs and reads logits through contents(), never inside a step); mmap'ed weights
// are wrapped without a copy where page-aligned. Pipelines are built once, when the engine resolves its
// kernels at load time, and cached by function name.
#define NS_PRIVATE_IMPLEMENTATION
#define MTL_PRIVATE_IMPLEMENTATION
#include <Foundation/Foundation.hpp>
#include <Metal/Metal.hpp>

#include <dlfcn.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <deque>
#include <map>
#include <stdexcept>
#include <string>

#include "metal_device.h"
#include "metal_engine/config.h"
#include "metal_kernels.h"

namespace metal_engine {
namespace {

// Runs `body` inside an autorelease pool, so the autoreleased objects metal-cpp hands back are freed.
template <class F>
auto with_pool(F&& body) {
  NS::AutoreleasePool* pool = NS::AutoreleasePool::alloc()->init();
  struct Drain {
    NS::AutoreleasePool* p;
    ~Drain() { p->release(); }
  } drain{pool};
  return body();
}

NS::String* ns_string(const std::string& s) { return NS::String::string(s.c_str(), NS::UTF8StringEncoding); }

std::string describe(NS::Error* e) {
  if (!e) return "no error description";
  NS::String* d = e->localizedDescription();
  return d ? d->utf8String() : "no error description";
}

class MetalBuffer : public Buffer {
 public:
  MetalBuffer(MTL::Buffer* b, size_t size) : buffer_(b), size_(size) {}
  ~MetalBuffer() override { buffer_->release(); }
  void* data() override { return buffer_->contents(); }  // asked each time: metal-sim checks every access
  size_t size() const override { return size_; }
  MTL::Buffer* mtl() const { return buffer_; }

 private:
  MTL::Buffer* buffer_;
  size_t size_;
};

bool file_exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

// metal_engine.metallib beside the module this code is linked into (the Python extension), if any.
std::string metallib_beside_module() {
  Dl_info info;
  if (!dladdr(reinterpret_cast<void*>(&create_metal_device), &info) || !info.dli_fname) return {};
  std::string path = info.dli_fname;
  const size_t slash = path.rfind('/');
  path = (slash == std::string::npos ? std::string(".") : path.substr(0, slash)) + "/metal_engine.metallib";
  return file_exists(path) ? path : std::string();
}

class MetalDevice : public Device {
 public:
  explicit MetalDevice(const std::string& backend) : backend_(backend) {
    device_ = MTL::CreateSystemDefaultDevice();
    if (!device_)
      throw std::runtime_error("backend '" + backend + "': no Metal device (MTLCreateSystemDefaultDevice returned nil)");
    with_pool([&] {
      device_name_ = device_->name()->utf8String();
      queue_ = device_->newCommandQueue();
      load_library();
      dummy_ = device_->newBuffer(16, MTL::ResourceStorageModeShared);  // bound where an optional input is absent
      return 0;
    });
    if (!queue_ || !library_ || !dummy_) throw std::runtime_error("backend '" + backend + "': Metal setup failed");
    // the tests' fault injection, on metal-sim only: a real GPU would silently compute garbage
    if (const char* skip = std::getenv("METAL_ENGINE_SKIP_BARRIER"); skip && backend_ == "metal-sim")
      skip_barrier_ = std::atoi(skip);
  }

  ~MetalDevice() override {
    abandon_step();
    while (!committed_.empty()) {  // steps still in flight finish before their buffers go
      committed_.front()->waitUntilCompleted();
      committed_.front()->release();
      committed_.pop_front();
    }
    for (auto& kv : pipelines_) kv.second->release();
    if (dummy_) dummy_->release();
    if (library_) library_->release();
    if (queue_) queue_->release();
    device_->release();
  }

  std::string name() const override { return backend_; }
  DeviceCaps caps() const override { return metal_device_caps(); }
  std::string description() const override { return device_name_ + ", kernels from " + library_origin_; }

  std::unique_ptr<Buffer> allocate(size_t bytes, const std::string& label) override {
    MTL::Buffer* b = device_->newBuffer(bytes ? bytes : 16, MTL::ResourceStorageModeShared);
    if (!b)
      throw std::runtime_error("the Metal device could not allocate " + std::to_string(bytes) + " bytes for " + label);
    with_pool([&] { b->setLabel(ns_string(label)); return 0; });
    return std::make_unique<MetalBuffer>(b, bytes);
  }

  std::unique_ptr<Buffer> wrap(void* host_ptr, size_t bytes, const std::string& label) override {
    const size_t page = size_t(::getpagesize());
    MTL::Buffer* b = nullptr;
    if (reinterpret_cast<uintptr_t>(host_ptr) % page == 0)  // no copy: the mapping is the buffer
      b = device_->newBuffer(host_ptr, (bytes + page - 1) / page * page, MTL::ResourceStorageModeShared, nullptr);
    if (!b) b = device_->newBuffer(host_ptr, bytes ? bytes : 1, MTL::ResourceStorageModeShared);  // a copy
    if (!b) throw std::runtime_error("the Metal device could not wrap " + std::to_string(bytes) + " bytes of " + label);
    with_pool([&] { b->setLabel(ns_string(label)); return 0; });
    return std::make_unique<MetalBuffer>(b, bytes);
  }

  Kernel kernel(const std::string& name) override {
    for (size_t i = 0; i < kernels_.size(); ++i)
      if (kernels_[i].name == name) return Kernel{int(i), name};
    Entry e{name, metal_kernel_spec(name), {}};
    for (const MetalPipelineKey& key : e.spec.pipelines) e.pipelines.push_back(pipeline(key));
    kernels_.push_back(std::move(e));
    return Kernel{int(kernels_.size() - 1), name};
  }
  std::vector<std::string> kernel_names() const override { return metal_kernel_names(); }

  void begin_step() override {
    if (command_buffer_) throw std::logic_error("begin_step() while a step is being encoded: submit() it first");
    step_pool_ = NS::AutoreleasePool::alloc()->init();
    command_buffer_ = queue_->commandBuffer()->retain();
    encoder_ = command_buffer_->computeCommandEncoder(MTL::DispatchTypeConcurrent)->retain();
    encoding_ = true;
    seg_reads_.clear();
    seg_writes_.clear();
    barriers_in_step_ = 0;
    encode_start_ = std::chrono::steady_clock::now();
    metal_calls_ = 3;  // commandBuffer, computeCommandEncoder, retain
  }

  void dispatch(const Kernel& k, const void* args, size_t args_size, std::initializer_list<BufferArg> buffers) override {
    if (!encoding_) throw std::logic_error("dispatch of '" + k.name + "' outside begin_step()/submit()");
    if (k.index < 0 || size_t(k.index) >= kernels_.size()) throw std::invalid_argument("unknown kernel handle");
    const Entry& e = kernels_[size_t(k.index)];
    if (args_size != e.spec.args_size || int(buffers.size()) != e.spec.num_buffers)
      throw std::invalid_argument("kernel '" + e.name + "' takes " + std::to_string(e.spec.args_size) +
                                  " argument bytes and " + std::to_string(e.spec.num_buffers) + " buffers, got " +
                                  std::to_string(args_size) + " and " + std::to_string(buffers.size()));
    const auto plan = e.spec.plan(args);
    MTL::ComputePipelineState* p = e.pipelines[size_t(plan.first)];
    const DispatchGeometry& g = plan.second;
    const size_t threads = size_t(g.threads[0]) * g.threads[1] * g.threads[2];
    if (threads > p->maxTotalThreadsPerThreadgroup())
      throw std::invalid_argument("kernel '" + e.spec.pipelines[size_t(plan.first)].function + "' needs " +
                                  std::to_string(threads) + " threads per threadgroup; its pipeline allows " +
                                  std::to_string(p->maxTotalThreadsPerThreadgroup()));
    const std::string& function = e.spec.pipelines[size_t(plan.first)].function;
    if (profiling_) profile_[function].calls += 1;
    metal_calls_ += 3 + buffers.size();  // setComputePipelineState, setBytes, setBuffer each, dispatchThreadgroups
    encoder_->setComputePipelineState(p);
    encoder_->setBytes(args, args_size, 0);
    NS::UInteger index = 1;
    for (const BufferArg& b : buffers) {
      if (b.buffer) {
        auto* mb = dynamic_cast<MetalBuffer*>(b.buffer);
        if (!mb) throw std::invalid_argument("kernel '" + e.name + "': buffer " + std::to_string(index) +
                                             " does not belong to this Metal device");
        encoder_->setBuffer(mb->mtl(), b.offset, index);
      } else {
        encoder_->setBuffer(dummy_, 0, index);
      }
      ++index;
    }
    barrier_if_needed(e.spec.writes, buffers);
    encoder_->dispatchThreadgroups(MTL::Size(g.groups[0], g.groups[1], g.groups[2]),
                                   MTL::Size(g.threads[0], g.threads[1], g.threads[2]));
  }

  // The encoder is concurrent: dispatches between two barriers may run at once. A barrier goes before a dispatch
  // only when it reads or writes a range an earlier dispatch since the last barrier wrote, or writes one such a
  // dispatch read (MLX's and ggml-metal's rule); each binding reaches from its offset over its bytes (a scratch
  // tensor's size) or, unsized, to its buffer's end. On metal-sim METAL_ENGINE_SKIP_BARRIER=n leaves out the n-th
  // needed barrier of every step: a fault the tests inject to show metal-sim catches a missing one.
  struct Range {
    const void* buffer;
    size_t lo, hi;
    bool overlaps(const Range& o) const { return buffer == o.buffer && lo < o.hi && o.lo < hi; }
  };
  void barrier_if_needed(unsigned written_mask, std::initializer_list<BufferArg> buffers) {
    Range reads[16], writes[16];
    int nr = 0, nw = 0, i = 0;
    bool hazard = false;
    for (const BufferArg& b : buffers) {
      const bool written = (written_mask >> i++) & 1;
      if (!b.buffer) continue;
      if ((written ? nw : nr) == 16) {  // more bindings than tracked: order this dispatch after everything
        hazard = true;
        continue;
      }
      const Range r{b.buffer, b.offset, b.bytes ? b.offset + b.bytes : b.buffer->size()};
      (written ? writes[nw++] : reads[nr++]) = r;
    }
    for (int w = 0; w < nw && !hazard; ++w) {
      for (const Range& x : seg_reads_) hazard = hazard || writes[w].overlaps(x);
      for (const Range& x : seg_writes_) hazard = hazard || writes[w].overlaps(x);
    }
    for (int r = 0; r < nr && !hazard; ++r)
      for (const Range& x : seg_writes_) hazard = hazard || reads[r].overlaps(x);
    if (hazard) {
      if (++barriers_in_step_ != skip_barrier_) {
        encoder_->memoryBarrier(MTL::BarrierScopeBuffers);
        ++metal_calls_;
      }
      if (profiling_) profile_["(memory barriers)"].calls += 1;
      seg_reads_.clear();
      seg_writes_.clear();
    }
    seg_reads_.insert(seg_reads_.end(), reads, reads + nr);
    seg_writes_.insert(seg_writes_.end(), writes, writes + nw);
  }

  void submit() override {
    if (!encoding_) throw std::logic_error("submit() without begin_step()");
    encoding_ = false;
    encoder_->endEncoding();
    if (profiling_) {  // the host's cost of encoding the step: from begin_step to here, and its metal-cpp calls
      KernelTime& t = profile_["(encode)"];
      t.calls += long(metal_calls_) + 2;  // with endEncoding and commit
      t.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - encode_start_).count();
    }
    command_buffer_->commit();
    committed_.push_back(command_buffer_);  // our reference moves to the queue of steps in flight
    encoder_->release();
    step_pool_->release();  // only the encoding's autoreleased objects: pools drain in LIFO order, steps do not
    encoder_ = nullptr;
    command_buffer_ = nullptr;
    step_pool_ = nullptr;
  }

  void wait() override {
    if (committed_.empty()) return;
    MTL::CommandBuffer* cb = committed_.front();
    committed_.pop_front();
    cb->waitUntilCompleted();
    std::string failure;
    if (cb->status() == MTL::CommandBufferStatusError) failure = with_pool([&] { return describe(cb->error()); });
    cb->release();
    if (!failure.empty()) throw std::runtime_error("the Metal command buffer failed: " + failure);
  }

  // Profiling counts launches per MSL function (what ran); a step's kernels share one command buffer, so
  // there are no per-kernel times.
  void set_profiling(bool on) override { profiling_ = on; }
  std::map<std::string, KernelTime> take_profile() override {
    std::map<std::string, KernelTime> out;
    out.swap(profile_);
    return out;
  }

  void abandon_step() override {
    if (!command_buffer_) return;
    if (encoding_) {
      encoder_->endEncoding();
      encoding_ = false;
    }
    end_step();  // never committed: released unexecuted
  }

 private:
  struct Entry {
    std::string name;
    MetalKernelSpec spec;
    std::vector<MTL::ComputePipelineState*> pipelines;  // owned by pipelines_
  };

  void end_step() {
    encoder_->release();
    command_buffer_->release();
    step_pool_->release();
    encoder_ = nullptr;
    command_buffer_ = nullptr;
    step_pool_ = nullptr;
  }

  // The kernels: METAL_ENGINE_METALLIB if set (empty: the embedded source), else metal_engine.metallib beside
  // the extension (built at install time), else compiled from the MSL source embedded in this library.
  void load_library() {
    NS::Error* error = nullptr;
    std::string path;
    if (const char* env = std::getenv("METAL_ENGINE_METALLIB")) {
      path = env;
      if (!path.empty() && !file_exists(path))
        throw std::invalid_argument("METAL_ENGINE_METALLIB='" + path + "' is not a file; unset it or point it at a metallib");
    } else {
      path = metallib_beside_module();
    }
    if (!path.empty()) {
      library_ = device_->newLibrary(NS::URL::fileURLWithPath(ns_string(path)), &error);
      if (!library_) throw std::runtime_error("could not load the Metal library " + path + ": " + describe(error));
      library_origin_ = path;
      return;
    }
    library_ = device_->newLibrary(ns_string(kMetalKernelSource), nullptr, &error);
    if (!library_) throw std::runtime_error("could not compile the Metal kernels from source: " + describe(error));
    library_origin_ = "the embedded MSL source";
  }

  // The pipeline cache, keyed by function name and function constants: built on first use (the engine
  // resolves every kernel it needs, with all its specialisations, at load time, so no step builds one).
  MTL::ComputePipelineState* pipeline(const MetalPipelineKey& key) {
    const std::string function = key.function;
    auto it = pipelines_.find(key.key());
    if (it != pipelines_.end()) return it->second;
    MTL::ComputePipelineState* p = with_pool([&]() -> MTL::ComputePipelineState* {
      NS::Error* error = nullptr;
      MTL::Function* f = nullptr;
      if (key.constants.empty()) {
        f = library_->newFunction(ns_string(function));
      } else {
        MTL::FunctionConstantValues* values = MTL::FunctionConstantValues::alloc()->init();
        for (const auto& c : key.constants) {
          const bool v = c.second;
          values->setConstantValue(&v, MTL::DataTypeBool, NS::UInteger(c.first));
        }
        f = library_->newFunction(ns_string(function), values, &error);
        values->release();
      }
      if (!f)
        throw std::runtime_error("the Metal library (" + library_origin_ + ") has no function '" + key.key() + "'" +
                                 (error ? ": " + describe(error) : std::string()));
      MTL::ComputePipelineState* ps = device_->newComputePipelineState(f, &error);
      f->release();
      if (!ps) throw std::runtime_error("could not build the Metal pipeline for '" + function + "': " + describe(error));
      return ps;
    });
    pipelines_[key.key()] = p;
    return p;
  }

  std::string backend_;
  std::string device_name_;
  std::string library_origin_;
  MTL::Device* device_ = nullptr;
  MTL::CommandQueue* queue_ = nullptr;
  MTL::Library* library_ = nullptr;
  MTL::Buffer* dummy_ = nullptr;
  std::map<std::string, MTL::ComputePipelineState*> pipelines_;  // by MetalPipelineKey::key()
  std::vector<Entry> kernels_;
  NS::AutoreleasePool* step_pool_ = nullptr;
  MTL::CommandBuffer* command_buffer_ = nullptr;  // the step being encoded
  MTL::ComputeCommandEncoder* encoder_ = nullptr;
  std::deque<MTL::CommandBuffer*> committed_;     // steps in flight, oldest first (retained)
  bool encoding_ = false;
  bool profiling_ = false;
  std::vector<Range> seg_reads_, seg_writes_;  // what the dispatches since the last barrier read and write
  int barriers_in_step_ = 0;
  std::chrono::steady_clock::time_point encode_start_;
  size_t metal_calls_ = 0;  // metal-cpp calls encoding this step
  int skip_barrier_ = 0;  // METAL_ENGINE_SKIP_BARRIER (0: none skipped)
  std::map<std::string, KernelTime> profile_;
};

}  // namespace

std::unique_ptr<Device> create_metal_device(const EngineConfig& config) {
  return std::make_unique<MetalDevice>(config.backend);
}

}  // namespace metal_engine
