// The engine core: a loaded model on one device, its weights' storage, the paged KV cache and the scratch pool,
// and one forward per step. It knows no architecture: the model file (src/models/<family>.cpp, found through
// the registry from config.json) names the weights and writes the forward against the ops API.
#include "metal_engine/engine.h"

#include <algorithm>
#include <cmath>
#include <deque>
#include <numeric>
#include <cstring>
#include <sstream>
#include <stdexcept>

#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#endif

#include "../../metal/op_args.h"
#include "../models/model.h"
#include "half.h"
#include "safetensors.h"

namespace metal_engine {

namespace {

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}

// Weight dtype conversion at load time (f32 -> f16 with F16C where the build has it).
void convert_elements(const uint8_t* src, DType from, uint8_t* dst, DType to, size_t n) {
  size_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
  if (from == DType::F32 && to == DType::F16) {
    for (; i + 8 <= n; i += 8) {
      __m256 v = _mm256_loadu_ps(reinterpret_cast<const float*>(src) + i);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
  }
#endif
  auto load = [&](size_t k) -> float {
    switch (from) {
      case DType::F32: { float f; std::memcpy(&f, src + 4 * k, 4); return f; }
      case DType::F16: { uint16_t h; std::memcpy(&h, src + 2 * k, 2); return half_to_float(h); }
      case DType::BF16: { uint16_t h; std::memcpy(&h, src + 2 * k, 2); return bf16_to_float(h); }
      default: return 0.f;
    }
  };
  for (; i < n; ++i) {
    float f = load(i);
    switch (to) {
      case DType::F32: std::memcpy(dst + 4 * i, &f, 4); break;
      case DType::F16: { uint16_t h = float_to_half(f); std::memcpy(dst + 2 * i, &h, 2); break; }
      case DType::BF16: { uint16_t h = float_to_bf16(f); std::memcpy(dst + 2 * i, &h, 2); break; }
      default: break;
    }
  }
}

}  // namespace

using models::Tensor;
using models::Weight;

struct Engine::Impl {
  EngineConfig config;
  ModelConfig model;
  std::unique_ptr<models::Model> arch;  // the architecture's weights and forward
  DType dtype = DType::F32;     // float weights
  DType kv_dtype = DType::F32;  // the KV cache (kv_cache_dtype; auto: dtype)
  DType act = DType::F32;       // activations
  std::unique_ptr<Device> device;
  std::unique_ptr<models::KernelCache> kernels;
  std::unique_ptr<SafetensorsCheckpoint> checkpoint;
  std::vector<std::unique_ptr<Buffer>> file_buffers;   // mmap'ed checkpoint files, wrapped without copy
  bool weights_in_place = false;                        // some weight is the mapped file itself
  std::vector<std::unique_ptr<Buffer>> owned_buffers;  // converted weights, RoPE tables
  std::unique_ptr<PagedKVCache> kv;
  std::unique_ptr<ScratchPool> scratch;   // the pool of a step submitted with none in flight
  std::unique_ptr<ScratchPool> scratch2;  // a second step's in flight (grows on demand): made at the first one

  // Steps submitted and not yet collected, oldest first (at most kMaxStepsInFlight).
  struct Submitted {
    uint64_t ticket;
    ScratchPool* pool;
    bool greedy;
    size_t rows;
    BufferArg out;       // logits f32 [rows, V] or greedy tokens i32 [rows], in `pool`
    bool fed = false;    // its token ids took the previous step's greedy tokens on the device
    std::string failed;  // the step it fed from failed on the device: this one computed from garbage
  };
  std::deque<Submitted> in_flight;
  uint64_t next_ticket = 1;
  // A greedy submitted step's tokens, copied into a buffer of their own (the next step reads them there while the
  // host reads that step's pool): step k's in feed[k % 2], i32 [feed_capacity[k % 2]]. Buffers replaced while a step
  // in flight may still bind them wait in retired_feeds until nothing is in flight.
  std::unique_ptr<Buffer> feed[2];
  int feed_capacity[2] = {0, 0};  // rows
  std::vector<std::unique_ptr<Buffer>> retired_feeds;
  bool last_fed_ok = false;  // the last submitted step was greedy, wrote its feed, and (so far) did not fail
  int last_feed_rows = 0;    // ... that many tokens

  void check_device_limits() const;
  // Measuring passes over the step shapes that take each kernel path: every kernel the model uses is resolved
  // (its pipelines built) at load, and a kernel this backend lacks fails here, not at a first step.
  void resolve_kernels();
  // Lays out the step in `pool` and (unless measuring) encodes it; with `greedy`, ends with argmax of the logits.
  // prev: the previous step's greedy tokens (i32 [prev_rows]) for in.prev_token_rows; feed_out (bound: a greedy
  // step) receives this step's tokens for the next.
  void encode_forward(const StepInput& in, ScratchPool& pool, bool greedy, BufferArg prev, int prev_rows,
                      BufferArg feed_out, BufferArg* logits_out, BufferArg* tokens_out);
  uint64_t submit(const StepInput& in, bool greedy, bool keep_feed);
  void collect(uint64_t ticket, bool greedy, void* out);
  const Submitted& find(uint64_t ticket) const;
};

namespace {

// The checkpoint side of models::WeightLoader: safetensors tensors checked against the shapes the model
// expects, used in place when already in the engine's dtype, else converted once into an owned buffer.
class CheckpointWeights : public models::WeightLoader {
 public:
  explicit CheckpointWeights(Engine::Impl& e) : e_(e) {}

  bool has(const std::string& name) const override { return e_.checkpoint->find(name) != nullptr; }

  Weight get(const std::string& name, const std::vector<int64_t>& shape, bool required) override {
    const TensorInfo* t = checked(name, shape, required);
    if (!t) return {};
    if (t->quant != QuantType::None) return in_place(*t, shape);
    if (t->dtype != e_.dtype) return owned_copy({t}, shape, name, false);
    Weight w;  // used in place: the mmap'ed file is the weight
    w.dtype = e_.dtype;
    w.shape = shape;
    w.arg = BufferArg{e_.file_buffers[size_t(t->file)].get(), t->offset};
    e_.weights_in_place = true;
    return w;
  }

  Weight fused(const std::vector<std::pair<std::string, std::vector<int64_t>>>& parts, bool required) override {
    if (!required) {
      bool any = false;
      for (const auto& p : parts) any |= has(p.first);
      if (!any) return {};
    }
    std::vector<const TensorInfo*> infos;
    std::vector<int64_t> shape = parts[0].second;
    shape[0] = 0;
    std::string label;
    for (const auto& [name, part_shape] : parts) {
      infos.push_back(checked(name, part_shape, true));
      shape[0] += part_shape[0];
      label += (label.empty() ? "" : " + ") + name;
    }
    bool quantized = false, mixed = false;
    for (const TensorInfo* t : infos) {
      quantized |= t->quant != QuantType::None;
      mixed |= t->quant != infos[0]->quant;
    }
    if (mixed) {  // a matmul per part (linear), each part as get() gives it
      Weight w;
      w.shape = shape;
      for (size_t i = 0; i < parts.size(); ++i) w.parts.push_back(get(parts[i].first, parts[i].second, true));
      w.arg = w.parts[0].arg;
      w.quant = w.parts[0].quant;
      w.dtype = w.parts[0].dtype;
      return w;
    }
    if (quantized) return quant_concat(infos, shape, label);
    return owned_copy(infos, shape, label, false);
  }

  Weight get_plus_one(const std::string& name, const std::vector<int64_t>& shape) override {
    const TensorInfo* t = checked(name, shape, true);
    if (t->quant != QuantType::None)
      throw std::invalid_argument("tensor '" + name + "' is " + quant_info(t->quant).name +
                                  " but is a norm weight, which metal_engine takes in a float type");
    return owned_copy({t}, shape, name, true);
  }

  Weight constant(const std::vector<float>& values, const std::string& label) override {
    auto buf = e_.device->allocate(sizeof(float) * std::max<size_t>(values.size(), 1), label);
    if (!values.empty()) std::memcpy(buf->data(), values.data(), sizeof(float) * values.size());
    Weight w;
    w.dtype = DType::F32;
    w.shape = {int64_t(values.size())};
    w.arg = BufferArg{buf.get(), 0};
    e_.owned_buffers.push_back(std::move(buf));
    return w;
  }

 private:
  // The tensor `name`, checked against the shape config.json implies and the checkpoint dtype; null if absent
  // and not required.
  const TensorInfo* checked(const std::string& name, const std::vector<int64_t>& expected, bool required) {
    const TensorInfo* t = e_.checkpoint->find(name);
    if (!t) {
      if (required)
        throw std::invalid_argument("checkpoint has no tensor '" + name + "', which " + e_.model.architecture +
                                    " with this config.json needs");
      return nullptr;
    }
    if (t->shape != expected)
      throw std::invalid_argument("tensor '" + name + "' has shape " + shape_str(t->shape) +
                                  " but config.json implies " + shape_str(expected));
    if (t->quant != QuantType::None) return t;
    if (!t->dtype_supported)
      throw std::invalid_argument("tensor '" + name + "' has dtype " + t->dtype_str +
                                  "; metal_engine loads F32, F16 and BF16 checkpoints and quantized ones it wrote");
    if (t->dtype != e_.model.checkpoint_dtype)
      throw std::invalid_argument("tensor '" + name + "' is " + t->dtype_str + " but config.json says dtype " +
                                  dtype_name(e_.model.checkpoint_dtype) + "; fix config.json's \"dtype\"");
    return t;
  }

  // A quantized tensor used in place: the mmap'ed blocks are the weight.
  Weight in_place(const TensorInfo& t, const std::vector<int64_t>& shape) {
    Weight w;
    w.quant = t.quant;
    w.shape = shape;
    w.arg = BufferArg{e_.file_buffers[size_t(t.file)].get(), t.offset};
    e_.weights_in_place = true;
    return w;
  }

  // Quantized parts of one format stacked along dim 0 (their rows of blocks, concatenated; fused() gives parts in
  // different formats a matmul each instead).
  Weight quant_concat(const std::vector<const TensorInfo*>& parts, std::vector<int64_t> shape, const std::string& label) {
    size_t bytes = 0;
    for (const TensorInfo* t : parts) bytes += t->nbytes;
    auto buf = e_.device->allocate(bytes, label);
    size_t at = 0;
    for (const TensorInfo* t : parts) {
      std::memcpy(static_cast<uint8_t*>(buf->data()) + at, e_.checkpoint->data(*t), t->nbytes);
      e_.checkpoint->files()[size_t(t->file)]->release(t->offset, t->nbytes);
      at += t->nbytes;
    }
    Weight w;
    w.quant = parts[0]->quant;
    w.shape = std::move(shape);
    w.arg = BufferArg{buf.get(), 0};
    e_.owned_buffers.push_back(std::move(buf));
    return w;
  }

  // A device buffer holding `parts` stacked along dim 0, converted to the engine's dtype (with plus_one,
  // 1 + w: a norm weight stored as an offset from one).
  Weight owned_copy(const std::vector<const TensorInfo*>& parts, std::vector<int64_t> shape, const std::string& label,
                    bool plus_one) {
    int64_t elements = 1;
    for (int64_t d : shape) elements *= d;
    auto buf = e_.device->allocate(size_t(elements) * dtype_size(e_.dtype), label);
    size_t at = 0;
    for (const TensorInfo* t : parts) {
      const size_t n = t->nbytes / dtype_size(t->dtype);
      uint8_t* dst = static_cast<uint8_t*>(buf->data()) + at;
      if (plus_one) {  // through f32: 1 + w rounded once to the engine's dtype
        std::vector<float> f(n);
        convert_elements(e_.checkpoint->data(*t), t->dtype, reinterpret_cast<uint8_t*>(f.data()), DType::F32, n);
        for (float& x : f) x += 1.0f;
        convert_elements(reinterpret_cast<const uint8_t*>(f.data()), DType::F32, dst, e_.dtype, n);
      } else {
        convert_elements(e_.checkpoint->data(*t), t->dtype, dst, e_.dtype, n);
      }
      e_.checkpoint->files()[size_t(t->file)]->release(t->offset, t->nbytes);  // its file pages are no longer needed
      at += n * dtype_size(e_.dtype);
    }
    Weight w;
    w.dtype = e_.dtype;
    w.shape = std::move(shape);
    w.arg = BufferArg{buf.get(), 0};
    e_.owned_buffers.push_back(std::move(buf));
    return w;
  }

  Engine::Impl& e_;
};

}  // namespace

void Engine::Impl::check_device_limits() const {
  const DeviceCaps caps = device->caps();
  const std::string who = "the " + device->name() + " backend";
  if (caps.max_attention_head_dim > 0 && model.head_dim > caps.max_attention_head_dim)
    throw std::invalid_argument(model.architecture + " has head_dim " + std::to_string(model.head_dim) + " but " + who +
                                "'s attention kernels take head_dim <= " + std::to_string(caps.max_attention_head_dim) +
                                "; use backend='cpu'");
  const int group = model.num_heads / model.num_kv_heads;
  if (caps.max_query_heads_per_kv_head > 0 && group > caps.max_query_heads_per_kv_head)
    throw std::invalid_argument(model.architecture + " has " + std::to_string(group) + " query heads per KV head but " +
                                who + "'s attention kernels take at most " +
                                std::to_string(caps.max_query_heads_per_kv_head) + "; use backend='cpu'");
  if (caps.max_attention_group_dims > 0 && group * model.head_dim > caps.max_attention_group_dims)
    throw std::invalid_argument(model.architecture + " has " + std::to_string(group) + " query heads of " +
                                std::to_string(model.head_dim) + " dims per KV head but " + who +
                                "'s attention kernels take at most " + std::to_string(caps.max_attention_group_dims) +
                                " dims over a KV head's query heads; use backend='cpu'");
}

void Engine::Impl::resolve_kernels() {
  const DeviceCaps caps = device->caps();
  auto shape = [&](int tokens, int seq_len) {  // one sequence: `tokens` new tokens ending a context of seq_len
    StepInput in;
    in.token_ids.assign(size_t(tokens), 0);
    for (int i = 0; i < tokens; ++i) in.positions.push_back(seq_len - tokens + i);
    in.query_start_loc = {0, tokens};
    in.seq_lens = {seq_len};
    in.block_table_width = 1;
    in.block_tables = {0};
    in.slot_mapping.assign(size_t(tokens), -1);
    in.logits_indices = {tokens - 1};
    return in;
  };
  std::vector<StepInput> shapes{shape(1, 1), shape(2, 2)};
  if (caps.prefill_attention_min_rows > 0)
    shapes.push_back(shape(caps.prefill_attention_min_rows, caps.prefill_attention_min_rows));
  if (caps.split_attention_keys > 0) shapes.push_back(shape(2, caps.split_attention_keys + 1));
  for (const StepInput& in : shapes) {
    BufferArg logits, tokens;
    scratch->begin(/*measuring=*/true);
    encode_forward(in, *scratch, /*greedy=*/true, {}, 0, {}, &logits, &tokens);
  }
  kernels->get("feed_tokens");  // steps in flight: a step's tokens from the one before it
}

std::unique_ptr<Engine> Engine::from_checkpoint(const std::string& dir, EngineConfig config) {
  auto impl = std::make_unique<Impl>();
  config.apply_env();
  if (config.block_size <= 0 || config.block_size > 1024)
    throw std::invalid_argument("block_size must be in 1..1024 (got " + std::to_string(config.block_size) + ")");
  impl->config = config;
  auto [model_config, arch] = models::read_model(read_text_file(dir + "/config.json"), dir + "/config.json");
  impl->model = std::move(model_config);
  impl->arch = std::move(arch);
  impl->dtype = resolve_dtype(config.dtype, impl->model.checkpoint_dtype);
  impl->device = create_device(config);
  const DeviceCaps caps = impl->device->caps();
  if (config.activation_dtype == "auto") {
    impl->act = caps.half_activations && impl->dtype != DType::F32 ? impl->dtype : DType::F32;
  } else {
    impl->act = dtype_from_string(config.activation_dtype);
    if (impl->act != DType::F32 && !caps.half_activations)
      throw std::invalid_argument("activation_dtype '" + config.activation_dtype + "': the " + impl->device->name() +
                                  " backend computes activations in float32 (use 'auto' or 'float32')");
    if (impl->act != DType::F32 && impl->act != impl->dtype)
      throw std::invalid_argument("activation_dtype '" + config.activation_dtype + "' with " +
                                  dtype_name(impl->dtype) + " weights: 16-bit activations take the weights' dtype "
                                  "(use 'auto', 'float32' or the weights' dtype)");
  }
  if (config.kv_cache_dtype == "auto") {
    impl->kv_dtype = impl->dtype;
  } else {
    const std::string k = config.kv_cache_dtype;
    if (k.rfind("fp8", 0) == 0 || k.rfind("int8", 0) == 0)
      throw std::invalid_argument("kv_cache_dtype '" + k + "': metal_engine keeps the KV cache in auto, float32, "
                                  "float16 or bfloat16");
    try {
      impl->kv_dtype = dtype_from_string(k);
    } catch (const std::invalid_argument&) {
      throw std::invalid_argument("kv_cache_dtype '" + k + "': use auto, float32, float16 or bfloat16");
    }
  }
  if (impl->act != DType::F32 && impl->kv_dtype != impl->act)
    throw std::invalid_argument("kv_cache_dtype '" + config.kv_cache_dtype + "' with " + dtype_name(impl->act) +
                                " activations: the " + impl->device->name() + " backend's attention kernels keep the "
                                "KV cache in the activations' 16-bit dtype (use kv_cache_dtype='auto' or "
                                "activation_dtype='float32')");
  impl->check_device_limits();
  impl->checkpoint = SafetensorsCheckpoint::open(dir);
  for (const auto& f : impl->checkpoint->files())
    impl->file_buffers.push_back(impl->device->wrap(const_cast<uint8_t*>(f->data()), f->size(), f->path()));
  {
    CheckpointWeights weights(*impl);
    impl->arch->load(weights);
  }
  if (!impl->weights_in_place) {  // every weight was converted: the mapped files are no longer needed
    impl->file_buffers.clear();
    impl->checkpoint.reset();
  }

  KVCacheShape kvs;
  kvs.num_layers = impl->model.num_layers;
  kvs.block_size = config.block_size;
  kvs.num_kv_heads = impl->model.num_kv_heads;
  kvs.head_dim = impl->model.head_dim;
  kvs.dtype = impl->kv_dtype;
  kvs.num_blocks = config.num_kv_blocks > 0 ? config.num_kv_blocks
                                            : KVCacheShape::blocks_for_budget(config.kv_cache_memory, kvs);
  impl->kv = std::make_unique<PagedKVCache>(*impl->device, kvs);
  impl->scratch = std::make_unique<ScratchPool>(*impl->device, config.scratch_pool_mb << 20);
  impl->kernels = std::make_unique<models::KernelCache>(*impl->device);
  impl->resolve_kernels();
  return std::unique_ptr<Engine>(new Engine(std::move(impl)));
}

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Engine::~Engine() {
  while (!impl_->in_flight.empty()) {  // steps still in flight finish before their buffers go
    impl_->in_flight.pop_front();
    try {
      impl_->device->wait();
    } catch (const std::exception&) {  // a step nobody will collect failed: nothing to report it to
    }
  }
}

const ModelConfig& Engine::model_config() const { return impl_->model; }
const EngineConfig& Engine::engine_config() const { return impl_->config; }
DType Engine::dtype() const { return impl_->dtype; }
DType Engine::activation_dtype() const { return impl_->act; }
DType Engine::kv_cache_dtype() const { return impl_->kv_dtype; }
Device& Engine::device() { return *impl_->device; }
PagedKVCache& Engine::kv_cache() { return *impl_->kv; }
ScratchPool& Engine::scratch_pool() { return *impl_->scratch; }

void Engine::validate(const StepInput& in) const {
  auto bad = [](const std::string& m) { throw std::invalid_argument("StepInput: " + m); };
  const int T = in.num_tokens();
  const int S = in.num_seqs();
  const int V = impl_->model.vocab_size;
  const int bs = impl_->kv->block_size();
  if (T <= 0) bad("token_ids is empty");
  if (int(in.positions.size()) != T) bad("positions has " + std::to_string(in.positions.size()) + " entries for " + std::to_string(T) + " tokens");
  if (int(in.slot_mapping.size()) != T) bad("slot_mapping has " + std::to_string(in.slot_mapping.size()) + " entries for " + std::to_string(T) + " tokens");
  if (S <= 0) bad("query_start_loc needs num_seqs + 1 entries (at least 2)");
  if (in.query_start_loc[0] != 0 || in.query_start_loc[size_t(S)] != T)
    bad("query_start_loc must start at 0 and end at num_tokens (" + std::to_string(T) + ")");
  if (int(in.seq_lens.size()) != S) bad("seq_lens has " + std::to_string(in.seq_lens.size()) + " entries for " + std::to_string(S) + " sequences");
  if (in.block_table_width <= 0 || in.block_tables.size() != size_t(S) * size_t(in.block_table_width))
    bad("block_tables must hold num_seqs x block_table_width = " + std::to_string(S) + " x " +
        std::to_string(in.block_table_width) + " entries (has " + std::to_string(in.block_tables.size()) + ")");
  for (int t = 0; t < T; ++t) {
    if (in.token_ids[size_t(t)] < 0 || in.token_ids[size_t(t)] >= V)
      bad("token id " + std::to_string(in.token_ids[size_t(t)]) + " at row " + std::to_string(t) +
          " is outside the vocabulary [0, " + std::to_string(V) + ")");
    if (in.positions[size_t(t)] < 0) bad("negative position at row " + std::to_string(t));
  }
  for (int s = 0; s < S; ++s) {
    const int q0 = in.query_start_loc[size_t(s)], q1 = in.query_start_loc[size_t(s) + 1];
    const int qlen = q1 - q0, len = in.seq_lens[size_t(s)];
    if (qlen <= 0) bad("sequence " + std::to_string(s) + " has no tokens (query_start_loc must increase)");
    if (len < qlen) bad("seq_lens[" + std::to_string(s) + "] = " + std::to_string(len) + " is smaller than its " + std::to_string(qlen) + " new tokens");
    const int nblocks = (len + bs - 1) / bs;
    if (nblocks > in.block_table_width)
      throw std::out_of_range("StepInput: sequence " + std::to_string(s) + " needs " + std::to_string(nblocks) +
                              " KV blocks for " + std::to_string(len) + " tokens but its block table holds " +
                              std::to_string(in.block_table_width));
    const int32_t* bt = in.block_tables.data() + size_t(s) * size_t(in.block_table_width);
    for (int b = 0; b < nblocks; ++b) impl_->kv->check_block_id(bt[b]);
    for (int i = 0; i < qlen; ++i) {
      // Positions have one source of truth: a sequence's new tokens sit at the end of its seq_lens context.
      const int p = len - qlen + i;
      if (in.positions[size_t(q0 + i)] != p)
        bad("positions[" + std::to_string(q0 + i) + "] = " + std::to_string(in.positions[size_t(q0 + i)]) +
            " but sequence " + std::to_string(s) + " (seq_lens " + std::to_string(len) + ", " + std::to_string(qlen) +
            " new tokens) puts that token at position " + std::to_string(p));
      const int64_t slot = in.slot_mapping[size_t(q0 + i)];
      if (slot < 0) continue;
      impl_->kv->check_slot(slot);
      const int64_t expect = int64_t(bt[p / bs]) * bs + p % bs;
      if (slot != expect)
        bad("slot_mapping[" + std::to_string(q0 + i) + "] = " + std::to_string(slot) + " but sequence " +
            std::to_string(s) + "'s block table puts context position " + std::to_string(p) + " in slot " +
            std::to_string(expect));
    }
  }
  for (size_t r = 0; r < in.logits_indices.size(); ++r)
    if (in.logits_indices[r] < 0 || in.logits_indices[r] >= T)
      bad("logits_indices[" + std::to_string(r) + "] = " + std::to_string(in.logits_indices[r]) +
          " is not a token row (0.." + std::to_string(T - 1) + ")");
}

// Uploads the step's inputs to `pool` and, unless the pool is only measuring, encodes the model's forward.
void Engine::Impl::encode_forward(const StepInput& in, ScratchPool& pool, bool greedy, BufferArg prev, int prev_rows,
                                  BufferArg feed_out, BufferArg* logits_out, BufferArg* tokens_out) {
  const int T = in.num_tokens(), S = in.num_seqs(), R = int(in.logits_indices.size());
  const size_t i32 = sizeof(int32_t);
  const bool fed = !in.prev_token_rows.empty(), feeds = greedy && feed_out.buffer && R > 0;
  models::Ops::StepTensors st;
  st.token_ids = pool.alloc(i32 * T, "token_ids");                             // i32 [T]
  st.positions = pool.alloc(i32 * T, "positions");                             // i32 [T]
  st.slot_mapping = pool.alloc(sizeof(int64_t) * T, "slot_mapping");           // i64 [T]
  st.query_start_loc = pool.alloc(i32 * (S + 1), "query_start_loc");           // i32 [S+1]
  st.seq_lens = pool.alloc(i32 * S, "seq_lens");                               // i32 [S]
  st.block_tables = pool.alloc(i32 * in.block_tables.size(), "block_tables");  // i32 [S, W]
  st.logits_indices = pool.alloc(i32 * std::max(R, 1), "logits_indices");      // i32 [R]
  BufferArg tokens = pool.alloc(i32 * std::max(R, 1), "greedy tokens");        // i32 [R]
  BufferArg prev_rows_buf = fed ? pool.alloc(i32 * T, "prev_token_rows") : BufferArg{};  // i32 [T]
  BufferArg iota = feeds ? pool.alloc(i32 * R, "0..R-1") : BufferArg{};                   // i32 [R]
  const bool measuring = st.token_ids.buffer == nullptr;
  if (!measuring) {
    auto upload = [&](BufferArg dst, const void* src, size_t bytes) {
      if (bytes) std::memcpy(pool.host_ptr(dst), src, bytes);
    };
    upload(st.token_ids, in.token_ids.data(), i32 * T);
    upload(st.positions, in.positions.data(), i32 * T);
    upload(st.slot_mapping, in.slot_mapping.data(), sizeof(int64_t) * T);
    upload(st.query_start_loc, in.query_start_loc.data(), i32 * (S + 1));
    upload(st.seq_lens, in.seq_lens.data(), i32 * S);
    upload(st.block_tables, in.block_tables.data(), i32 * in.block_tables.size());
    upload(st.logits_indices, in.logits_indices.data(), i32 * R);
    if (fed) upload(prev_rows_buf, in.prev_token_rows.data(), i32 * T);
    if (feeds) std::iota(static_cast<int32_t*>(pool.host_ptr(iota)), static_cast<int32_t*>(pool.host_ptr(iota)) + R, 0);
  }
  if (fed) {  // the previous step's greedy tokens into this step's token ids, by the embedding (models/ops.cpp)
    st.prev_tokens = prev;
    st.prev_token_rows = prev_rows_buf;
    st.prev_rows = prev_rows;
  }
  models::Ops ops(*device, *kernels, pool, *kv, act, in, st, measuring, model.num_heads, model.head_dim);
  Tensor logits = arch->forward(ops);  // f32 [R, V]
  if (greedy && R > 0) {                // i32 [R]
    const Kernel& argmax = kernels->get("argmax");
    if (!measuring) device->dispatch(argmax, ArgmaxArgs{R, model.vocab_size}, {logits.arg, tokens});
    if (!measuring && feeds) device->dispatch(kernels->get("feed_tokens"), FeedTokensArgs{R, R}, {tokens, iota, feed_out});
  }
  *logits_out = logits.arg;
  *tokens_out = tokens;
}

uint64_t Engine::Impl::submit(const StepInput& in, bool greedy, bool keep_feed) {
  if (int(in_flight.size()) >= kMaxStepsInFlight)
    throw std::logic_error("Engine::submit: " + std::to_string(in_flight.size()) +
                           " steps are submitted and not collected (at most " + std::to_string(kMaxStepsInFlight) +
                           " in flight): collect the oldest first");
  const uint64_t ticket = next_ticket;
  const int prev_slot = int((ticket - 1) % 2), slot = int(ticket % 2);
  const bool fed = !in.prev_token_rows.empty();
  if (fed) {
    if (int(in.prev_token_rows.size()) != in.num_tokens())
      throw std::invalid_argument("StepInput: prev_token_rows has " + std::to_string(in.prev_token_rows.size()) +
                                  " entries for " + std::to_string(in.num_tokens()) + " tokens");
    if (!last_fed_ok)
      throw std::invalid_argument("StepInput: prev_token_rows takes the greedy tokens of the step submitted just "
                                  "before, but that step was not a greedy Engine::submit (or it failed)");
    for (size_t t = 0; t < in.prev_token_rows.size(); ++t) {
      const int r = in.prev_token_rows[t];
      if (r < -1 || r >= last_feed_rows)
        throw std::invalid_argument("StepInput: prev_token_rows[" + std::to_string(t) + "] = " + std::to_string(r) +
                                    " but the previous step returned " + std::to_string(last_feed_rows) +
                                    " greedy tokens (-1: the row's own token id)");
    }
  }
  // The pool no step in flight uses: the first unless a step in flight holds it.
  ScratchPool* pool = scratch.get();
  for (const Submitted& s : in_flight)
    if (s.pool == scratch.get()) {
      if (!scratch2) scratch2 = std::make_unique<ScratchPool>(*device, scratch->capacity(), /*grow_on_demand=*/true);
      pool = scratch2.get();
    }
  const int R = int(in.logits_indices.size());
  const bool feeds = greedy && keep_feed && R > 0;
  if (feeds && feed_capacity[slot] < R) {  // this step's feed buffer, grown (the one replaced may be bound in flight)
    if (feed[slot]) retired_feeds.push_back(std::move(feed[slot]));
    const int rows = std::max(R, 256);
    feed[slot] = device->allocate(sizeof(int32_t) * size_t(rows), "greedy tokens for the next step");
    feed_capacity[slot] = rows;
  }
  const int prev_rows = fed ? last_feed_rows : 0;
  const BufferArg prev = fed ? BufferArg{feed[prev_slot].get(), 0, sizeof(int32_t) * size_t(prev_rows)} : BufferArg{};
  const BufferArg feed_out = feeds ? BufferArg{feed[slot].get(), 0, sizeof(int32_t) * size_t(R)} : BufferArg{};
  BufferArg logits, tokens;
  pool->begin(/*measuring=*/true);
  encode_forward(in, *pool, greedy, prev, prev_rows, feed_out, &logits, &tokens);
  pool->reserve(pool->peak());
  pool->begin(false);
  Device& d = *device;
  d.begin_step();
  try {
    encode_forward(in, *pool, greedy, prev, prev_rows, feed_out, &logits, &tokens);
    d.submit();
  } catch (...) {
    d.abandon_step();  // nothing of a step that failed to encode runs; the engine stays usable
    throw;
  }
  ++next_ticket;
  last_fed_ok = feeds;  // what the next step may feed from: this step's R tokens
  last_feed_rows = feeds ? R : 0;
  in_flight.push_back(Submitted{ticket, pool, greedy, size_t(R), greedy ? tokens : logits, fed, {}});
  return ticket;
}

const Engine::Impl::Submitted& Engine::Impl::find(uint64_t ticket) const {
  for (const Submitted& s : in_flight)
    if (s.ticket == ticket) return s;
  throw std::invalid_argument("Engine: step " + std::to_string(ticket) +
                              " is not in flight (collected before, or never submitted)");
}

void Engine::Impl::collect(uint64_t ticket, bool greedy, void* out) {
  const Submitted& f = find(ticket);
  if (f.ticket != in_flight.front().ticket)
    throw std::invalid_argument("Engine::collect: step " + std::to_string(ticket) + " was submitted after step " +
                                std::to_string(in_flight.front().ticket) + ", which is not collected: steps are "
                                "collected in the order they were submitted");
  if (f.greedy != greedy)
    throw std::invalid_argument(std::string("Engine::collect: step ") + std::to_string(ticket) + " was submitted " +
                                (f.greedy ? "greedy (collect its tokens)" : "for logits (collect its logits)"));
  Submitted s = f;
  in_flight.pop_front();
  std::string failure = s.failed.empty() ? "" : "it took its tokens from a step that failed: " + s.failed;
  try {
    device->wait();
  } catch (const std::exception& e) {
    failure = e.what();
  }
  if (in_flight.empty()) retired_feeds.clear();
  if (!failure.empty()) {  // whatever took this step's tokens on the device computed from garbage
    if (!in_flight.empty() && in_flight.front().fed) in_flight.front().failed = failure;
    if (in_flight.empty()) last_fed_ok = false;
    throw std::runtime_error("step " + std::to_string(ticket) + " failed: " + failure);
  }
  const size_t n = s.rows * (greedy ? 1 : size_t(model.vocab_size));
  if (n) std::memcpy(out, s.pool->host_ptr(s.out), n * (greedy ? sizeof(int32_t) : sizeof(float)));
}

uint64_t Engine::submit(const StepInput& in, bool greedy) {
  validate(in);
  return impl_->submit(in, greedy, /*keep_feed=*/true);
}

void Engine::collect(uint64_t ticket, float* logits) { impl_->collect(ticket, false, logits); }
void Engine::collect(uint64_t ticket, int32_t* tokens) { impl_->collect(ticket, true, tokens); }
int Engine::steps_in_flight() const { return int(impl_->in_flight.size()); }
size_t Engine::result_rows(uint64_t ticket) const { return impl_->find(ticket).rows; }
bool Engine::result_is_greedy(uint64_t ticket) const { return impl_->find(ticket).greedy; }

static void check_none_in_flight(const Engine& e, const char* what) {
  if (e.steps_in_flight() > 0)
    throw std::logic_error(std::string("Engine::") + what + " while " + std::to_string(e.steps_in_flight()) +
                           " submitted steps are not collected: collect them first");
}

void Engine::step(const StepInput& in, float* logits) {
  check_none_in_flight(*this, "step");
  validate(in);
  impl_->collect(impl_->submit(in, false, false), false, logits);
}

void Engine::step_greedy(const StepInput& in, int32_t* tokens) {
  check_none_in_flight(*this, "step_greedy");
  validate(in);
  impl_->collect(impl_->submit(in, true, false), true, tokens);
}

std::vector<float> Engine::step(const StepInput& in) {
  std::vector<float> out(in.logits_indices.size() * size_t(impl_->model.vocab_size));
  step(in, out.data());
  return out;
}

}  // namespace metal_engine
