// metal-sim's stand-in for Apple's Metal framework: the NS and MTL classes our metal-cpp backend calls,
// registered as Objective-C classes in GCC's runtime (libobjc), so the unchanged metal-cpp host code runs
// on Linux. metal-cpp sends every call through objc_msgSend (objc_msgsend_x86_64.S), which looks the
// method up here. Command buffers run their kernels on metal-sim's kernel emulator (../runtime.h) when
// committed.
//
// What a Metal device refuses, this refuses too, by throwing metal_sim::Refusal (a std::runtime_error)
// out of the call: a buffer binding out of range (index past 30, offset past the buffer's end, setBytes
// past 4 KB), too much threadgroup memory, more threads per threadgroup than the pipeline allows, a
// dispatch with no pipeline or after endEncoding. So does what our engine forbids: waiting on a command
// buffer that is still being encoded (a GPU would never finish it), and reading a buffer's contents while
// a command buffer that binds it has not been waited for (a read-back inside a step). A kernel that fails
// on the emulator (a deadlock, a thread leaving a barrier behind) fails its command buffer: status
// MTLCommandBufferStatusError and an NSError, as a GPU fault would. A selector with no method here aborts
// with its name: never a silent garbage result.
#include <objc/message.h>
#include <objc/runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <regex>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "../runtime.h"
#include "refusal.h"

namespace metal_sim {
namespace {

using NSUInteger = unsigned long;
using NSInteger = long;

struct MTLSize {  // MTL::Size: three NSUIntegers, passed on the stack, returned through _stret
  NSUInteger width, height, depth;
};

// Limits of an Apple-silicon GPU (M1..M4), as the real device reports them.
constexpr NSUInteger kMaxThreadsPerThreadgroup = 1024;
constexpr NSUInteger kMaxThreadgroupMemory = 32768;
constexpr NSUInteger kMaxBufferArguments = 31;
constexpr NSUInteger kMaxSetBytes = 4096;
constexpr NSUInteger kSimdWidth = 32;

// ---- objects: an Objective-C instance is this header, its C++ state behind `impl` ----------------------

struct Impl {
  virtual ~Impl() = default;
  std::string label;
};

struct Header {
  Class isa;
  std::atomic<long> refs;
  Impl* impl;
};

Class g_root = Nil;

id make(Class cls, Impl* impl) {
  id o = class_createInstance(cls, 0);
  Header* h = reinterpret_cast<Header*>(o);
  h->refs.store(1);
  h->impl = impl;
  return o;
}
Header* hdr(id o) { return reinterpret_cast<Header*>(o); }
template <class T>
T* impl_of(id o) {
  return o ? static_cast<T*>(hdr(o)->impl) : nullptr;
}
id retain(id o) {
  if (o) hdr(o)->refs.fetch_add(1);
  return o;
}
void release(id o) {
  if (!o) return;
  if (hdr(o)->refs.fetch_sub(1) == 1) {
    delete hdr(o)->impl;
    object_dispose(o);
  }
}

// Autorelease pools: a per-thread stack; objects autoreleased with no pool are kept (and leak), as Cocoa
// does after logging.
struct PoolImpl : Impl {
  std::vector<id> objects;
  ~PoolImpl() override {
    for (id o : objects) release(o);
  }
};
thread_local std::vector<id> t_pools;

id autorelease(id o) {
  if (o && !t_pools.empty()) impl_of<PoolImpl>(t_pools.back())->objects.push_back(o);
  return o;
}

// ---- NSString, NSError, NSURL --------------------------------------------------------------------------

Class g_string, g_error, g_url, g_pool;

struct StringImpl : Impl {
  std::string s;
};
id make_string(const std::string& s) {
  auto* i = new StringImpl;
  i->s = s;
  return make(g_string, i);
}
std::string string_of(id s) {
  StringImpl* i = impl_of<StringImpl>(s);
  return i ? i->s : std::string();
}

struct ErrorImpl : Impl {
  std::string domain, description;
  NSInteger code = 0;
  id description_string = nil;
  ~ErrorImpl() override { release(description_string); }
};
id make_error(NSInteger code, const std::string& description) {
  auto* e = new ErrorImpl;
  e->domain = "MTLSimErrorDomain";
  e->code = code;
  e->description = description;
  return make(g_error, e);
}
void set_error_out(id* out, NSInteger code, const std::string& description) {
  if (out) *out = autorelease(make_error(code, description));
}

struct URLImpl : Impl {
  std::string path;
};

// ---- device, buffers, library, functions, pipelines -----------------------------------------------------

Class g_device, g_buffer, g_library, g_function, g_pipeline, g_queue, g_command_buffer, g_encoder, g_constants;

struct BufferImpl : Impl {
  void* data = nullptr;
  NSUInteger length = 0;
  bool owned = false;
  int in_flight = 0;  // command buffers binding it that have not been waited for
  ~BufferImpl() override {
    if (owned) std::free(data);
  }
};

struct LibraryImpl : Impl {
  std::set<std::string> functions;
};
struct ConstantValuesImpl : Impl {
  std::vector<FunctionConstant> values;
};
struct FunctionImpl : Impl {
  std::string name;
  std::vector<FunctionConstant> constants;
};
struct PipelineImpl : Impl {
  std::string function;
  std::vector<FunctionConstant> constants;
  NSUInteger max_threads = kMaxThreadsPerThreadgroup;
};

std::mutex g_mutex;  // guards in_flight counts

[[noreturn]] void refuse(const std::string& what) { throw Refusal("metal-sim refused: " + what); }

// Kernel names a library built from `text` holds: `kernel void name(` outside templates, and every
// `template [[host_name("name")]]` instantiation (metal-sim compiles the kernels at build time; a library
// offers those of them its source or metallib names).
std::set<std::string> kernel_names_in(const std::string& text) {
  std::set<std::string> out, templated;
  static const std::regex inst(R"(template\s*\[\[\s*host_name\(\s*\"([^\"]+)\"\s*\)\s*\]\]\s*kernel\s+decltype\(\s*(\w+))");
  for (auto it = std::sregex_iterator(text.begin(), text.end(), inst); it != std::sregex_iterator(); ++it) {
    out.insert((*it)[1]);
    templated.insert((*it)[2]);
  }
  static const std::regex plain(R"(kernel\s+void\s+(\w+)\s*\()");
  for (auto it = std::sregex_iterator(text.begin(), text.end(), plain); it != std::sregex_iterator(); ++it)
    if (!templated.count((*it)[1])) out.insert((*it)[1]);
  return out;
}

id make_library(const std::set<std::string>& names, id* error) {
  link_engine_kernels();
  const std::vector<std::string> compiled = kernel_names();
  auto* lib = new LibraryImpl;
  std::string missing;
  for (const std::string& n : names) {
    if (std::find(compiled.begin(), compiled.end(), n) != compiled.end()) lib->functions.insert(n);
    else missing += (missing.empty() ? "" : ", ") + n;
  }
  if (!missing.empty()) {
    delete lib;
    set_error_out(error, 3, "metal-sim compiles its kernels at build time and has none named: " + missing);
    return nil;
  }
  return make(g_library, lib);
}

// ---- queue, command buffer, compute encoder --------------------------------------------------------------

enum CommandBufferStatus : NSUInteger { kNotEnqueued = 0, kEnqueued = 1, kCommitted = 2, kScheduled = 3,
                                        kCompleted = 4, kError = 5 };

struct Binding {
  id buffer = nil;  // retained by the command buffer
  NSUInteger offset = 0;
  std::vector<unsigned char> bytes;  // setBytes: a copy
  bool bound = false;
};

struct Dispatch {
  std::string function;
  std::vector<FunctionConstant> constants;
  NSUInteger threadgroup_memory = 0;  // dynamic, setThreadgroupMemoryLength
  std::vector<Binding> bindings;  // [kMaxBufferArguments]
  MTLSize groups{}, threads{};
  bool concurrent_with_previous = false;  // a concurrent encoder's, with no memory barrier since the last one
};

struct CommandBufferImpl : Impl {
  NSUInteger status = kNotEnqueued;
  std::vector<Dispatch> dispatches;
  std::vector<id> referenced;  // buffers bound by any dispatch: retained, in flight until waited for
  id error = nil;
  bool encoding = false;  // an encoder is open
  bool waited = false;
  void unlock() {
    std::lock_guard<std::mutex> lock(g_mutex);
    for (id b : referenced) impl_of<BufferImpl>(b)->in_flight -= 1;
    for (id b : referenced) release(b);
    referenced.clear();
  }
  ~CommandBufferImpl() override {
    unlock();
    release(error);
  }
};

struct EncoderImpl : Impl {
  id command_buffer = nil;  // weak: the command buffer outlives its encoder's use
  id pipeline = nil;        // retained
  std::vector<Binding> bindings = std::vector<Binding>(kMaxBufferArguments);
  std::vector<NSUInteger> threadgroup_memory = std::vector<NSUInteger>(kMaxBufferArguments, 0);
  bool ended = false;
  bool concurrent = false;  // MTLDispatchTypeConcurrent
  bool dispatched = false;  // a dispatch since the encoder began or since its last memory barrier
  ~EncoderImpl() override {
    release(pipeline);
    for (Binding& b : bindings) release(b.buffer);
  }
};

// Runs a command buffer's dispatches. Dispatches a concurrent encoder issued with no memory barrier between them
// may run at once on a GPU, so here their threadgroups run interleaved: all of them in a seeded random order
// (METAL_SIM_SEED, default 0), or with METAL_SIM_REVERSE_ORDER=1 last-to-first (the later dispatch's groups
// before the earlier's), so a dispatch that reads another's output without a barrier sees it unwritten.
void run_command_buffer(CommandBufferImpl& cb) {
  const bool reverse = std::getenv("METAL_SIM_REVERSE_ORDER") && std::getenv("METAL_SIM_REVERSE_ORDER")[0] == '1';
  const char* seed_env = std::getenv("METAL_SIM_SEED");
  static std::atomic<uint64_t> committed{0};  // each command buffer its own order, the sequence seeded
  std::mt19937_64 rng((seed_env ? std::strtoull(seed_env, nullptr, 10) : 0) * 0x9E3779B97F4A7C15ULL + committed++);
  auto options_of = [&](const Dispatch& d, int64_t only_group) {
    DispatchOptions opt;
    opt.max_threads_per_threadgroup = int(kMaxThreadsPerThreadgroup);
    opt.constants = d.constants;
    opt.dynamic_threadgroup_memory = d.threadgroup_memory;
    opt.max_threadgroup_memory = kMaxThreadgroupMemory;
    opt.reverse_order = reverse;
    opt.only_group = only_group;
    return opt;
  };
  auto pointers_of = [](const Dispatch& d) {
    std::vector<void*> ptrs(kMaxBufferArguments, nullptr);
    for (NSUInteger i = 0; i < kMaxBufferArguments; ++i) {
      const Binding& b = d.bindings[i];
      if (!b.bound) continue;
      if (b.buffer) ptrs[i] = static_cast<char*>(impl_of<BufferImpl>(b.buffer)->data) + b.offset;
      else ptrs[i] = const_cast<unsigned char*>(b.bytes.data());
    }
    return ptrs;
  };
  auto grid = [](const MTLSize& s) { return Dim3{uint32_t(s.width), uint32_t(s.height), uint32_t(s.depth)}; };
  size_t i = 0;
  while (i < cb.dispatches.size()) {
    size_t j = i + 1;  // [i, j): dispatches that may run at once
    while (j < cb.dispatches.size() && cb.dispatches[j].concurrent_with_previous) ++j;
    const Dispatch* failed = nullptr;
    try {
      if (j == i + 1) {
        failed = &cb.dispatches[i];
        const std::vector<void*> ptrs = pointers_of(*failed);
        dispatch(failed->function, ptrs.data(), grid(failed->groups), grid(failed->threads), options_of(*failed, -1));
      } else {
        std::vector<std::vector<void*>> ptrs;
        std::vector<std::pair<size_t, int64_t>> order;  // (dispatch, threadgroup)
        for (size_t k = i; k < j; ++k) {
          ptrs.push_back(pointers_of(cb.dispatches[k]));
          const MTLSize& g = cb.dispatches[k].groups;
          for (int64_t t = 0; t < int64_t(g.width * g.height * g.depth); ++t) order.emplace_back(k, t);
        }
        if (reverse) std::reverse(order.begin(), order.end());
        else std::shuffle(order.begin(), order.end(), rng);
        for (const auto& [k, t] : order) {
          failed = &cb.dispatches[k];
          dispatch(failed->function, ptrs[k - i].data(), grid(failed->groups), grid(failed->threads),
                   options_of(*failed, t));
        }
      }
    } catch (const std::exception& e) {
      cb.status = kError;
      cb.error = make_error(1, std::string("kernel '") + failed->function + "' failed: " + e.what());
      return;
    }
    i = j;
  }
  cb.status = kCompleted;
}

// ---- method implementations ------------------------------------------------------------------------------

#define SELF_IMPL(T) T* self_impl = impl_of<T>(self)

// NSObject (root)
id obj_alloc(id cls, SEL) { return make(reinterpret_cast<Class>(cls), nullptr); }
id obj_new(id cls, SEL) { return make(reinterpret_cast<Class>(cls), nullptr); }
id obj_init(id self, SEL) { return self; }
id obj_retain(id self, SEL) { return retain(self); }
void obj_release(id self, SEL) { release(self); }
id obj_autorelease(id self, SEL) { return autorelease(self); }
NSUInteger obj_retain_count(id self, SEL) { return NSUInteger(hdr(self)->refs.load()); }
bool obj_responds(id self, SEL, SEL query) { return class_respondsToSelector(object_getClass(self), query); }
id obj_method_signature(id, SEL, SEL) { return nil; }  // no forwarding: respondsToSelector: says it all
id obj_label(id self, SEL) {
  Impl* i = hdr(self)->impl;
  return i && !i->label.empty() ? autorelease(make_string(i->label)) : nil;
}
void obj_set_label(id self, SEL, id s) {
  if (Impl* i = hdr(self)->impl) i->label = string_of(s);
}
id obj_description(id self, SEL) { return autorelease(make_string(std::string("<") + object_getClassName(self) + ">")); }

// NSAutoreleasePool
id pool_init(id self, SEL) {
  hdr(self)->impl = new PoolImpl;
  t_pools.push_back(self);
  return self;
}
void pool_drain(id self, SEL) {  // drain and release both end the pool
  auto it = std::find(t_pools.begin(), t_pools.end(), self);
  if (it != t_pools.end()) {
    for (auto j = t_pools.end(); j != it;) release(*--j);  // inner pools first
    t_pools.erase(it, t_pools.end());
  } else {
    release(self);
  }
}
void pool_add_object(id, SEL, id o) { autorelease(o); }

// NSString
id string_with_c_string(id, SEL, const char* s, NSUInteger) { return autorelease(make_string(s ? s : "")); }
id string_with_utf8(id, SEL, const char* s) { return autorelease(make_string(s ? s : "")); }
id string_empty(id, SEL) { return autorelease(make_string("")); }
id string_with_string(id, SEL, id other) { return autorelease(make_string(string_of(other))); }
const char* string_utf8(id self, SEL) { return impl_of<StringImpl>(self)->s.c_str(); }
const char* string_c_string(id self, SEL, NSUInteger) { return impl_of<StringImpl>(self)->s.c_str(); }
NSUInteger string_length(id self, SEL) { return impl_of<StringImpl>(self)->s.size(); }
bool string_is_equal(id self, SEL, id other) { return string_of(self) == string_of(other); }

// NSError
NSInteger error_code(id self, SEL) { return impl_of<ErrorImpl>(self)->code; }
id error_domain(id self, SEL) { return autorelease(make_string(impl_of<ErrorImpl>(self)->domain)); }
id error_description(id self, SEL) {
  SELF_IMPL(ErrorImpl);
  if (!self_impl->description_string) self_impl->description_string = make_string(self_impl->description);
  return self_impl->description_string;
}

// NSURL
id url_file_url_with_path(id, SEL, id path) {
  auto* u = new URLImpl;
  u->path = string_of(path);
  return autorelease(make(g_url, u));
}
id url_path(id self, SEL) { return autorelease(make_string(impl_of<URLImpl>(self)->path)); }

// MTLDevice
id device_name(id, SEL) { return autorelease(make_string("metal-sim (CPU stand-in for an Apple GPU)")); }
bool device_yes(id, SEL) { return true; }
uint64_t device_registry_id(id, SEL) { return 0x5153494dULL; }
NSUInteger device_max_threadgroup_memory(id, SEL) { return kMaxThreadgroupMemory; }
NSUInteger device_max_buffer_length(id, SEL) { return NSUInteger(1) << 34; }
uint64_t device_working_set(id, SEL) { return uint64_t(8) << 30; }
MTLSize device_max_threads(id, SEL) { return {kMaxThreadsPerThreadgroup, kMaxThreadsPerThreadgroup, kMaxThreadsPerThreadgroup}; }

id device_new_buffer(id, SEL, NSUInteger length, NSUInteger) {
  auto* b = new BufferImpl;
  b->length = length;
  b->owned = true;
  b->data = std::calloc(std::max<NSUInteger>(length, 1), 1);
  if (!b->data) {
    delete b;
    return nil;  // as Metal: nil when the allocation fails
  }
  return make(g_buffer, b);
}
id device_new_buffer_bytes(id self, SEL sel, const void* bytes, NSUInteger length, NSUInteger options) {
  id b = device_new_buffer(self, sel, length, options);
  if (b && length) std::memcpy(impl_of<BufferImpl>(b)->data, bytes, length);
  return b;
}
id device_new_buffer_no_copy(id, SEL, void* pointer, NSUInteger length, NSUInteger, void* deallocator) {
  const long page = 4096;  // Metal wants page-aligned memory and a whole number of pages
  if (reinterpret_cast<uintptr_t>(pointer) % page || length % page) return nil;
  if (deallocator) refuse("newBufferWithBytesNoCopy: with a deallocator block is not supported; pass nil");
  auto* b = new BufferImpl;
  b->data = pointer;
  b->length = length;
  return make(g_buffer, b);
}
// A source in tools/metal_prepass.py --embed's sections (`// ---- name ----`, as the backend embeds it): each
// section must be the very text metal-sim's kernels were built from (their registered hashes), or the library
// would offer kernels compiled from other code than the source says. Returns the first mismatch, or "".
std::string embedded_source_mismatch(const std::string& text) {
  static const std::regex marker("\n// ---- (\\S+) ----\n");
  std::vector<std::pair<std::string, size_t>> starts;  // name, where its text begins
  std::vector<size_t> ends;
  for (auto it = std::sregex_iterator(text.begin(), text.end(), marker); it != std::sregex_iterator(); ++it) {
    if (!starts.empty()) ends.push_back(size_t(it->position()));
    starts.emplace_back((*it)[1], size_t(it->position() + it->length()));
  }
  ends.push_back(text.size());
  for (size_t i = 0; i < starts.size(); ++i) {
    const std::string& name = starts[i].first;
    const uint64_t want = metal_sim::source_hash(name);
    if (want == 0) return "its section " + name + " is no file metal-sim's kernels were built from";
    if (metal_sim::fnv1a64(text.substr(starts[i].second, ends[i] - starts[i].second)) != want)
      return "its " + name + " is not the text metal-sim's kernels were built from (a stale embedded source: rebuild)";
  }
  return "";
}

id device_new_library_source(id, SEL, id source, id, id* error) {
  const std::string text = string_of(source);
  link_engine_kernels();
  const std::string mismatch = embedded_source_mismatch(text);
  if (!mismatch.empty()) {
    set_error_out(error, 3, "newLibraryWithSource: " + mismatch);
    return nil;
  }
  return make_library(kernel_names_in(text), error);
}
id device_new_library_url(id, SEL, id url, id* error) {
  // metal-sim's metallib (written at build time by tools/metal_prepass.py --library): a header line, then
  // the names of the kernels it holds
  const std::string path = url ? impl_of<URLImpl>(url)->path : std::string();
  std::ifstream f(path);
  std::string line;
  if (!f || !std::getline(f, line) || line != "metal-sim library 1") {
    set_error_out(error, 2, "'" + path + "' is not a metal-sim library (written by tools/metal_prepass.py --library)");
    return nil;
  }
  std::set<std::string> names;
  while (std::getline(f, line))
    if (!line.empty()) names.insert(line);
  return make_library(names, error);
}
id device_new_default_library(id, SEL) { return nil; }  // no app bundle, as a command-line process on macOS
id device_new_pipeline(id, SEL, id function, id* error) {
  FunctionImpl* f = impl_of<FunctionImpl>(function);
  if (!f) {
    set_error_out(error, 4, "newComputePipelineStateWithFunction: with a nil function");
    return nil;
  }
  for (int index : function_constant_indices(f->name)) {  // as Metal: a specialised function or none
    bool given = false;
    for (const FunctionConstant& c : f->constants) given |= c.index == index;
    if (!given) {
      set_error_out(error, 5, "function constant " + std::to_string(index) + " of '" + f->name +
                                  "' is not set (use newFunctionWithName:constantValues:error:)");
      return nil;
    }
  }
  auto* p = new PipelineImpl;
  p->function = f->name;
  p->constants = f->constants;
  return make(g_pipeline, p);
}
id device_new_queue(id, SEL) { return make(g_queue, new Impl); }

// MTLBuffer
void* buffer_contents(id self, SEL) {
  SELF_IMPL(BufferImpl);
  std::lock_guard<std::mutex> lock(g_mutex);
  if (self_impl->in_flight)
    refuse("contents of buffer '" + self_impl->label + "' while a command buffer that binds it has not been waited "
           "for (a read-back inside a step: commit, waitUntilCompleted, then read)");
  return self_impl->data;
}
NSUInteger buffer_length(id self, SEL) { return impl_of<BufferImpl>(self)->length; }

// MTLLibrary, MTLFunction, MTLComputePipelineState
id library_new_function(id self, SEL, id name) {
  const std::string n = string_of(name);
  if (!impl_of<LibraryImpl>(self)->functions.count(n)) return nil;  // as Metal: nil for an unknown name
  auto* f = new FunctionImpl;
  f->name = n;
  return make(g_function, f);
}
id library_new_function_constants(id self, SEL sel, id name, id values, id* error) {
  id f = library_new_function(self, sel, name);
  if (!f) {
    set_error_out(error, 6, "the library has no function '" + string_of(name) + "'");
    return nil;
  }
  if (values) impl_of<FunctionImpl>(f)->constants = impl_of<ConstantValuesImpl>(values)->values;
  return f;
}

// MTLFunctionConstantValues
id constants_init(id self, SEL) {
  hdr(self)->impl = new ConstantValuesImpl;
  return self;
}
void constants_set(id self, SEL, const void* value, NSUInteger type, NSUInteger index) {
  size_t size = 0;
  switch (type) {  // MTLDataType
    case 53: case 45: case 49: size = 1; break;                   // bool, char, uchar
    case 16: case 37: case 41: size = 2; break;                   // half, short, ushort
    case 3: case 29: case 33: size = 4; break;                    // float, int, uint
    default: refuse("setConstantValue:type:atIndex: with MTLDataType " + std::to_string(type) +
                    " (metal-sim takes scalar bool, char, short, half, int, uint and float constants)");
  }
  auto& values = impl_of<ConstantValuesImpl>(self)->values;
  FunctionConstant c;
  c.index = int(index);
  c.value.assign(static_cast<const unsigned char*>(value), static_cast<const unsigned char*>(value) + size);
  for (FunctionConstant& v : values)
    if (v.index == c.index) {
      v = c;
      return;
    }
  values.push_back(c);
}

id function_name(id self, SEL) { return autorelease(make_string(impl_of<FunctionImpl>(self)->name)); }
NSUInteger pipeline_max_threads(id self, SEL) { return impl_of<PipelineImpl>(self)->max_threads; }
NSUInteger pipeline_execution_width(id, SEL) { return kSimdWidth; }
NSUInteger pipeline_static_tg_memory(id, SEL) { return 0; }

// MTLCommandQueue, MTLCommandBuffer
id queue_command_buffer(id, SEL) { return autorelease(make(g_command_buffer, new CommandBufferImpl)); }
id command_buffer_encoder(id self, SEL) {
  SELF_IMPL(CommandBufferImpl);
  if (self_impl->status != kNotEnqueued) refuse("computeCommandEncoder on a command buffer already committed");
  if (self_impl->encoding) refuse("computeCommandEncoder while another encoder of this command buffer is open");
  self_impl->encoding = true;
  auto* e = new EncoderImpl;
  e->command_buffer = self;
  return autorelease(make(g_encoder, e));
}
id command_buffer_encoder_typed(id self, SEL sel, NSUInteger type) {
  id encoder = command_buffer_encoder(self, sel);
  impl_of<EncoderImpl>(encoder)->concurrent = type == 1;  // MTLDispatchTypeConcurrent
  return encoder;
}
void command_buffer_commit(id self, SEL) {
  SELF_IMPL(CommandBufferImpl);
  if (self_impl->status != kNotEnqueued) refuse("commit of a command buffer committed before");
  if (self_impl->encoding) refuse("commit while a compute encoder is open (call endEncoding first)");
  self_impl->status = kCommitted;
  run_command_buffer(*self_impl);
}
void command_buffer_wait(id self, SEL) {
  SELF_IMPL(CommandBufferImpl);
  if (self_impl->status < kCommitted)
    refuse("waitUntilCompleted on a command buffer that was never committed: the step is still being encoded "
           "(a GPU would never finish it)");
  self_impl->waited = true;
  self_impl->unlock();
}
NSUInteger command_buffer_status(id self, SEL) { return impl_of<CommandBufferImpl>(self)->status; }
id command_buffer_error(id self, SEL) { return impl_of<CommandBufferImpl>(self)->error; }

// MTLComputeCommandEncoder
EncoderImpl* open_encoder(id self, const char* what) {
  EncoderImpl* e = impl_of<EncoderImpl>(self);
  if (e->ended) refuse(std::string(what) + " after endEncoding");
  return e;
}
void check_index(NSUInteger index, const char* what) {
  if (index >= kMaxBufferArguments)
    refuse(std::string(what) + " at index " + std::to_string(index) + ": a Metal kernel has buffer indices 0.." +
           std::to_string(kMaxBufferArguments - 1));
}
void encoder_set_pipeline(id self, SEL, id pipeline) {
  EncoderImpl* e = open_encoder(self, "setComputePipelineState:");
  release(e->pipeline);
  e->pipeline = retain(pipeline);
}
void encoder_set_buffer(id self, SEL, id buffer, NSUInteger offset, NSUInteger index) {
  EncoderImpl* e = open_encoder(self, "setBuffer:offset:atIndex:");
  check_index(index, "setBuffer:offset:atIndex:");
  if (buffer) {
    BufferImpl* b = impl_of<BufferImpl>(buffer);
    if (offset >= std::max<NSUInteger>(b->length, 1))
      refuse("setBuffer:offset:atIndex: binds buffer '" + b->label + "' at offset " + std::to_string(offset) +
             " but it holds only " + std::to_string(b->length) + " bytes (buffer binding out of range)");
  }
  Binding& slot = e->bindings[index];
  release(slot.buffer);
  slot = Binding{retain(buffer), offset, {}, buffer != nil};
}
void encoder_set_bytes(id self, SEL, const void* bytes, NSUInteger length, NSUInteger index) {
  EncoderImpl* e = open_encoder(self, "setBytes:length:atIndex:");
  check_index(index, "setBytes:length:atIndex:");
  if (length > kMaxSetBytes)
    refuse("setBytes:length:atIndex: with " + std::to_string(length) + " bytes: Metal takes at most " +
           std::to_string(kMaxSetBytes) + " (use a buffer)");
  Binding& slot = e->bindings[index];
  release(slot.buffer);
  slot = Binding{nil, 0, std::vector<unsigned char>(static_cast<const unsigned char*>(bytes),
                                                    static_cast<const unsigned char*>(bytes) + length), true};
}
void encoder_set_tg_memory(id self, SEL, NSUInteger length, NSUInteger index) {
  EncoderImpl* e = open_encoder(self, "setThreadgroupMemoryLength:atIndex:");
  check_index(index, "setThreadgroupMemoryLength:atIndex:");
  if (length % 16)
    refuse("setThreadgroupMemoryLength:atIndex: with " + std::to_string(length) + " bytes: must be a multiple of 16");
  e->threadgroup_memory[index] = length;
}
void encoder_dispatch(id self, SEL, MTLSize groups, MTLSize threads) {
  EncoderImpl* e = open_encoder(self, "dispatchThreadgroups:threadsPerThreadgroup:");
  if (!e->pipeline) refuse("dispatchThreadgroups:threadsPerThreadgroup: with no compute pipeline state set");
  PipelineImpl* p = impl_of<PipelineImpl>(e->pipeline);
  const NSUInteger per_group = threads.width * threads.height * threads.depth;
  if (per_group > p->max_threads)
    refuse("dispatch of '" + p->function + "' with " + std::to_string(per_group) +
           " threads per threadgroup; its pipeline allows at most " + std::to_string(p->max_threads));
  if (per_group == 0 || groups.width * groups.height * groups.depth == 0)
    refuse("dispatch of '" + p->function + "' with an empty grid or threadgroup");
  NSUInteger tg_memory = 0;
  for (NSUInteger m : e->threadgroup_memory) tg_memory += m;
  if (tg_memory > kMaxThreadgroupMemory)
    refuse("dispatch of '" + p->function + "' with " + std::to_string(tg_memory) +
           " bytes of threadgroup memory; the device has " + std::to_string(kMaxThreadgroupMemory));
  CommandBufferImpl* cb = impl_of<CommandBufferImpl>(e->command_buffer);
  Dispatch d;
  d.function = p->function;
  d.constants = p->constants;
  d.threadgroup_memory = tg_memory;
  d.bindings = e->bindings;
  d.groups = groups;
  d.threads = threads;
  d.concurrent_with_previous = e->concurrent && e->dispatched;
  e->dispatched = true;
  std::lock_guard<std::mutex> lock(g_mutex);
  for (const Binding& b : d.bindings) {  // the command buffer keeps each bound buffer alive and in flight
    if (!b.buffer) continue;
    cb->referenced.push_back(retain(b.buffer));
    impl_of<BufferImpl>(b.buffer)->in_flight += 1;
  }
  cb->dispatches.push_back(std::move(d));
}
// Orders every dispatch before it against every one after (the only ordering a concurrent encoder has).
void encoder_memory_barrier(id self, SEL, NSUInteger) { open_encoder(self, "memoryBarrierWithScope:")->dispatched = false; }
void encoder_end(id self, SEL) {
  EncoderImpl* e = open_encoder(self, "endEncoding");
  e->ended = true;
  impl_of<CommandBufferImpl>(e->command_buffer)->encoding = false;
}

// ---- registration ------------------------------------------------------------------------------------------

void add(Class cls, const char* selector, void* imp) {
  class_addMethod(cls, sel_registerName(selector), reinterpret_cast<IMP>(imp), "@@:");
}
void add_class_method(Class cls, const char* selector, void* imp) {
  add(object_getClass(reinterpret_cast<id>(cls)), selector, imp);
}
Class subclass(const char* name) {
  Class c = objc_allocateClassPair(g_root, name, 0);
  return c;
}

IMP missing_method(id receiver, SEL selector) {
  std::fprintf(stderr, "metal-sim: [%s %s] is not implemented by metal-sim's Metal stand-in\n",
               receiver ? object_getClassName(receiver) : "nil", sel_getName(selector));
  std::abort();
}

void register_classes() {
  __objc_msg_forward2 = missing_method;

  g_root = objc_allocateClassPair(Nil, "NSObject", 0);
  class_addIvar(g_root, "isa", sizeof(Class), 3, "#");
  class_addIvar(g_root, "me_refs", sizeof(long), 3, "q");
  class_addIvar(g_root, "me_impl", sizeof(void*), 3, "^v");
  add_class_method(g_root, "alloc", reinterpret_cast<void*>(obj_alloc));
  add_class_method(g_root, "new", reinterpret_cast<void*>(obj_new));
  add_class_method(g_root, "respondsToSelector:", reinterpret_cast<void*>(obj_responds));
  add(g_root, "init", reinterpret_cast<void*>(obj_init));
  add(g_root, "retain", reinterpret_cast<void*>(obj_retain));
  add(g_root, "release", reinterpret_cast<void*>(obj_release));
  add(g_root, "autorelease", reinterpret_cast<void*>(obj_autorelease));
  add(g_root, "retainCount", reinterpret_cast<void*>(obj_retain_count));
  add(g_root, "respondsToSelector:", reinterpret_cast<void*>(obj_responds));
  add(g_root, "methodSignatureForSelector:", reinterpret_cast<void*>(obj_method_signature));
  add(g_root, "description", reinterpret_cast<void*>(obj_description));
  objc_registerClassPair(g_root);
  if (ivar_getOffset(class_getInstanceVariable(g_root, "me_impl")) != ptrdiff_t(offsetof(Header, impl))) {
    std::fprintf(stderr, "metal-sim: unexpected NSObject instance layout\n");
    std::abort();
  }

  g_pool = subclass("NSAutoreleasePool");
  add(g_pool, "init", reinterpret_cast<void*>(pool_init));
  add(g_pool, "drain", reinterpret_cast<void*>(pool_drain));
  add(g_pool, "release", reinterpret_cast<void*>(pool_drain));
  add(g_pool, "addObject:", reinterpret_cast<void*>(pool_add_object));
  objc_registerClassPair(g_pool);

  g_string = subclass("NSString");
  add_class_method(g_string, "stringWithCString:encoding:", reinterpret_cast<void*>(string_with_c_string));
  add_class_method(g_string, "stringWithUTF8String:", reinterpret_cast<void*>(string_with_utf8));
  add_class_method(g_string, "string", reinterpret_cast<void*>(string_empty));
  add_class_method(g_string, "stringWithString:", reinterpret_cast<void*>(string_with_string));
  add(g_string, "UTF8String", reinterpret_cast<void*>(string_utf8));
  add(g_string, "cStringUsingEncoding:", reinterpret_cast<void*>(string_c_string));
  add(g_string, "length", reinterpret_cast<void*>(string_length));
  add(g_string, "isEqualToString:", reinterpret_cast<void*>(string_is_equal));
  objc_registerClassPair(g_string);

  g_error = subclass("NSError");
  add(g_error, "code", reinterpret_cast<void*>(error_code));
  add(g_error, "domain", reinterpret_cast<void*>(error_domain));
  add(g_error, "localizedDescription", reinterpret_cast<void*>(error_description));
  objc_registerClassPair(g_error);

  g_url = subclass("NSURL");
  add_class_method(g_url, "fileURLWithPath:", reinterpret_cast<void*>(url_file_url_with_path));
  add(g_url, "path", reinterpret_cast<void*>(url_path));
  objc_registerClassPair(g_url);

  g_device = subclass("MTLSimDevice");
  add(g_device, "name", reinterpret_cast<void*>(device_name));
  add(g_device, "hasUnifiedMemory", reinterpret_cast<void*>(device_yes));
  add(g_device, "registryID", reinterpret_cast<void*>(device_registry_id));
  add(g_device, "maxThreadgroupMemoryLength", reinterpret_cast<void*>(device_max_threadgroup_memory));
  add(g_device, "maxBufferLength", reinterpret_cast<void*>(device_max_buffer_length));
  add(g_device, "recommendedMaxWorkingSetSize", reinterpret_cast<void*>(device_working_set));
  add(g_device, "maxThreadsPerThreadgroup", reinterpret_cast<void*>(device_max_threads));
  add(g_device, "newBufferWithLength:options:", reinterpret_cast<void*>(device_new_buffer));
  add(g_device, "newBufferWithBytes:length:options:", reinterpret_cast<void*>(device_new_buffer_bytes));
  add(g_device, "newBufferWithBytesNoCopy:length:options:deallocator:",
      reinterpret_cast<void*>(device_new_buffer_no_copy));
  add(g_device, "newLibraryWithSource:options:error:", reinterpret_cast<void*>(device_new_library_source));
  add(g_device, "newLibraryWithURL:error:", reinterpret_cast<void*>(device_new_library_url));
  add(g_device, "newDefaultLibrary", reinterpret_cast<void*>(device_new_default_library));
  add(g_device, "newComputePipelineStateWithFunction:error:", reinterpret_cast<void*>(device_new_pipeline));
  add(g_device, "newCommandQueue", reinterpret_cast<void*>(device_new_queue));
  objc_registerClassPair(g_device);

  g_buffer = subclass("MTLSimBuffer");
  add(g_buffer, "contents", reinterpret_cast<void*>(buffer_contents));
  add(g_buffer, "length", reinterpret_cast<void*>(buffer_length));
  add(g_buffer, "label", reinterpret_cast<void*>(obj_label));
  add(g_buffer, "setLabel:", reinterpret_cast<void*>(obj_set_label));
  objc_registerClassPair(g_buffer);

  g_library = subclass("MTLSimLibrary");
  add(g_library, "newFunctionWithName:", reinterpret_cast<void*>(library_new_function));
  add(g_library, "newFunctionWithName:constantValues:error:", reinterpret_cast<void*>(library_new_function_constants));
  objc_registerClassPair(g_library);

  g_constants = subclass("MTLFunctionConstantValues");
  add(g_constants, "init", reinterpret_cast<void*>(constants_init));
  add(g_constants, "setConstantValue:type:atIndex:", reinterpret_cast<void*>(constants_set));
  objc_registerClassPair(g_constants);

  g_function = subclass("MTLSimFunction");
  add(g_function, "name", reinterpret_cast<void*>(function_name));
  objc_registerClassPair(g_function);

  g_pipeline = subclass("MTLSimComputePipelineState");
  add(g_pipeline, "maxTotalThreadsPerThreadgroup", reinterpret_cast<void*>(pipeline_max_threads));
  add(g_pipeline, "threadExecutionWidth", reinterpret_cast<void*>(pipeline_execution_width));
  add(g_pipeline, "staticThreadgroupMemoryLength", reinterpret_cast<void*>(pipeline_static_tg_memory));
  objc_registerClassPair(g_pipeline);

  g_queue = subclass("MTLSimCommandQueue");
  add(g_queue, "commandBuffer", reinterpret_cast<void*>(queue_command_buffer));
  add(g_queue, "label", reinterpret_cast<void*>(obj_label));
  add(g_queue, "setLabel:", reinterpret_cast<void*>(obj_set_label));
  objc_registerClassPair(g_queue);

  g_command_buffer = subclass("MTLSimCommandBuffer");
  add(g_command_buffer, "computeCommandEncoder", reinterpret_cast<void*>(command_buffer_encoder));
  add(g_command_buffer, "computeCommandEncoderWithDispatchType:", reinterpret_cast<void*>(command_buffer_encoder_typed));
  add(g_command_buffer, "commit", reinterpret_cast<void*>(command_buffer_commit));
  add(g_command_buffer, "waitUntilCompleted", reinterpret_cast<void*>(command_buffer_wait));
  add(g_command_buffer, "status", reinterpret_cast<void*>(command_buffer_status));
  add(g_command_buffer, "error", reinterpret_cast<void*>(command_buffer_error));
  add(g_command_buffer, "label", reinterpret_cast<void*>(obj_label));
  add(g_command_buffer, "setLabel:", reinterpret_cast<void*>(obj_set_label));
  objc_registerClassPair(g_command_buffer);

  g_encoder = subclass("MTLSimComputeCommandEncoder");
  add(g_encoder, "setComputePipelineState:", reinterpret_cast<void*>(encoder_set_pipeline));
  add(g_encoder, "setBuffer:offset:atIndex:", reinterpret_cast<void*>(encoder_set_buffer));
  add(g_encoder, "setBytes:length:atIndex:", reinterpret_cast<void*>(encoder_set_bytes));
  add(g_encoder, "setThreadgroupMemoryLength:atIndex:", reinterpret_cast<void*>(encoder_set_tg_memory));
  add(g_encoder, "dispatchThreadgroups:threadsPerThreadgroup:", reinterpret_cast<void*>(encoder_dispatch));
  add(g_encoder, "memoryBarrierWithScope:", reinterpret_cast<void*>(encoder_memory_barrier));
  add(g_encoder, "endEncoding", reinterpret_cast<void*>(encoder_end));
  add(g_encoder, "label", reinterpret_cast<void*>(obj_label));
  add(g_encoder, "setLabel:", reinterpret_cast<void*>(obj_set_label));
  objc_registerClassPair(g_encoder);
}

// Before any static initialiser of metal-cpp looks a class up (constructor priority 101 runs first).
__attribute__((constructor(101))) void register_at_load() { register_classes(); }

}  // namespace
}  // namespace metal_sim

// ---- C entry points ----------------------------------------------------------------------------------------

extern "C" {

// objc_msgSend's method lookup (objc_msgsend_x86_64.S): nil receivers get the runtime's nil method (returns
// 0); a selector with no method reaches missing_method through __objc_msg_forward2 and aborts with its name.
IMP me_sim_objc_lookup(id receiver, SEL selector) { return objc_msg_lookup(receiver, selector); }

id MTLCreateSystemDefaultDevice() {
  static id device = metal_sim::make(metal_sim::g_device, new metal_sim::Impl);
  return metal_sim::retain(device);  // "new"-style: the caller owns a reference
}
static void not_implemented(const char* what) {
  std::fprintf(stderr, "metal-sim: %s is not implemented by metal-sim's Metal stand-in\n", what);
  std::abort();
}
id MTLCopyAllDevices() { not_implemented("MTLCopyAllDevices"); return nil; }
id MTLCopyAllDevicesWithObserver(id*, void*) { not_implemented("MTLCopyAllDevicesWithObserver"); return nil; }
void MTLRemoveDeviceObserver(id) { not_implemented("MTLRemoveDeviceObserver"); }
}
