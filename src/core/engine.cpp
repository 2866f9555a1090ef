// The engine: loads a Llama-family checkpoint onto a device and runs one forward per step.
// The forward pass (encode_forward) reads like the model: embed, then per layer
// RMSNorm -> attention (RoPE, paged KV) -> residual, RMSNorm -> SwiGLU MLP -> residual; final norm, LM head.
#include "metal_engine/engine.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>
#include <stdexcept>

#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#endif

#include "../../metal/op_args.h"
#include "half.h"
#include "safetensors.h"

namespace metal_engine {

namespace {

constexpr int kPrefillAttentionMinRows = 16;  // a chunk this long takes the tiled prefill attention (Metal)
constexpr int kAttentionPartition = 256;      // keys per partition of the split attention (Metal)

// A weight on the device: a binding plus what it holds.
struct Weight {
  BufferArg arg;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  bool present() const { return arg.buffer != nullptr; }
};

struct LayerWeights {
  Weight input_norm;                    // [hidden]
  Weight qkv_proj;                      // [heads*hd + 2*kv_heads*hd, hidden]: q_proj, k_proj, v_proj fused
  Weight qkv_bias;                      // [heads*hd + 2*kv_heads*hd]              (Qwen2, Llama+bias)
  Weight o_proj, o_bias;                // [hidden, heads*hd], [hidden]
  Weight post_attention_norm;           // [hidden]
  Weight gate_up_proj;                  // [2*intermediate, hidden]: gate_proj, up_proj fused
  Weight gate_up_bias;                  // [2*intermediate]                        (Llama mlp_bias)
  Weight down_proj, down_bias;          // [hidden, intermediate], [hidden]
};

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

struct Engine::Impl {
  EngineConfig config;
  ModelConfig model;
  DType dtype = DType::F32;  // weights and KV cache
  DType act = DType::F32;    // activations
  std::unique_ptr<Device> device;
  std::unique_ptr<SafetensorsCheckpoint> checkpoint;
  std::vector<std::unique_ptr<Buffer>> file_buffers;   // mmap'ed checkpoint files, wrapped without copy
  bool weights_in_place = false;                        // some weight is the mapped file itself
  std::vector<std::unique_ptr<Buffer>> owned_buffers;  // converted weights, RoPE table
  Weight embed_tokens, final_norm, lm_head;
  std::vector<LayerWeights> layers;
  BufferArg rope_inv_freq;  // f32 [head_dim / 2]
  std::unique_ptr<PagedKVCache> kv;
  std::unique_ptr<ScratchPool> scratch;

  struct Kernels {
    Kernel embedding, rms_norm, matmul, lm_head, rope, silu_mul, kv_write, paged_attention, gather_rows, argmax;
    // Metal only: the tiled prefill attention, and the split-and-reduce attention for long contexts
    Kernel paged_attention_prefill, paged_attention_split, paged_attention_reduce, paged_attention_decode;
    bool has_prefill_attention = false, has_split_attention = false, has_decode_attention = false;
  } k;

  // The checkpoint's tensor `name`, checked against the shape config.json implies and the checkpoint dtype;
  // null if absent and not required.
  const TensorInfo* checked_tensor(const std::string& name, const std::vector<int64_t>& expected, bool required);
  Weight load_weight(const std::string& name, std::vector<int64_t> expected, bool required);
  // Several checkpoint tensors stacked along dim 0 into one weight (q/k/v, gate/up: one matmul instead of
  // several). Each part is checked like load_weight's; `present` false gives an empty weight.
  Weight load_fused(const std::vector<std::pair<std::string, std::vector<int64_t>>>& parts, bool present);
  // A device buffer holding `parts` stacked along dim 0, converted to the engine's dtype.
  Weight owned_copy(const std::vector<const TensorInfo*>& parts, std::vector<int64_t> shape, const std::string& label);
  void load_weights();
  void build_rope_table();
  // Lays out the step in `pool` and (unless measuring) encodes it; with `greedy`, ends with argmax of the logits.
  void encode_forward(const StepInput& in, ScratchPool& pool, bool greedy, BufferArg* logits_out,
                      BufferArg* tokens_out);
  void run_step(const StepInput& in, bool greedy, BufferArg* logits, BufferArg* tokens);
};

const TensorInfo* Engine::Impl::checked_tensor(const std::string& name, const std::vector<int64_t>& expected,
                                               bool required) {
  const TensorInfo* t = checkpoint->find(name);
  if (!t) {
    if (required)
      throw std::invalid_argument("checkpoint has no tensor '" + name + "', which " + model.architecture +
                                  " with this config.json needs");
    return nullptr;
  }
  if (t->shape != expected)
    throw std::invalid_argument("tensor '" + name + "' has shape " + shape_str(t->shape) + " but config.json implies " +
                                shape_str(expected));
  if (!t->dtype_supported)
    throw std::invalid_argument("tensor '" + name + "' has dtype " + t->dtype_str +
                                "; metal_engine loads F32, F16 and BF16 checkpoints");
  if (t->dtype != model.checkpoint_dtype)
    throw std::invalid_argument("tensor '" + name + "' is " + t->dtype_str + " but config.json says dtype " +
                                dtype_name(model.checkpoint_dtype) + "; fix config.json's \"dtype\"");
  return t;
}

Weight Engine::Impl::load_weight(const std::string& name, std::vector<int64_t> expected, bool required) {
  const TensorInfo* t = checked_tensor(name, expected, required);
  if (!t) return {};
  if (t->dtype != dtype) return owned_copy({t}, expected, name);
  Weight w;  // used in place: the mmap'ed file is the weight
  w.dtype = dtype;
  w.shape = expected;
  w.arg = BufferArg{file_buffers[size_t(t->file)].get(), t->offset};
  weights_in_place = true;
  return w;
}

Weight Engine::Impl::load_fused(const std::vector<std::pair<std::string, std::vector<int64_t>>>& parts,
                                bool present) {
  if (!present) return {};
  std::vector<const TensorInfo*> infos;
  std::vector<int64_t> shape = parts[0].second;
  shape[0] = 0;
  std::string label;
  for (const auto& [name, part_shape] : parts) {
    infos.push_back(checked_tensor(name, part_shape, true));
    shape[0] += part_shape[0];
    label += (label.empty() ? "" : " + ") + name;
  }
  return owned_copy(infos, shape, label);
}

Weight Engine::Impl::owned_copy(const std::vector<const TensorInfo*>& parts, std::vector<int64_t> shape,
                                const std::string& label) {
  int64_t elements = 1;
  for (int64_t d : shape) elements *= d;
  auto buf = device->allocate(size_t(elements) * dtype_size(dtype), label);
  size_t at = 0;
  for (const TensorInfo* t : parts) {
    const size_t n = t->nbytes / dtype_size(t->dtype);
    convert_elements(checkpoint->data(*t), t->dtype, static_cast<uint8_t*>(buf->data()) + at, dtype, n);
    checkpoint->files()[size_t(t->file)]->release(t->offset, t->nbytes);  // its file pages are no longer needed
    at += n * dtype_size(dtype);
  }
  Weight w;
  w.dtype = dtype;
  w.shape = std::move(shape);
  w.arg = BufferArg{buf.get(), 0};
  owned_buffers.push_back(std::move(buf));
  return w;
}

void Engine::Impl::load_weights() {
  const ModelConfig& m = model;
  const int64_t H = m.hidden_size, I = m.intermediate_size, V = m.vocab_size;
  const int64_t QD = int64_t(m.num_heads) * m.head_dim, KD = int64_t(m.num_kv_heads) * m.head_dim;
  for (const auto& f : checkpoint->files())
    file_buffers.push_back(device->wrap(const_cast<uint8_t*>(f->data()), f->size(), f->path()));

  embed_tokens = load_weight("model.embed_tokens.weight", {V, H}, true);
  final_norm = load_weight("model.norm.weight", {H}, true);
  lm_head = m.tie_word_embeddings ? embed_tokens : load_weight("lm_head.weight", {V, H}, true);
  layers.resize(size_t(m.num_layers));
  for (int l = 0; l < m.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    LayerWeights& L = layers[size_t(l)];
    L.input_norm = load_weight(p + "input_layernorm.weight", {H}, true);
    L.qkv_proj = load_fused({{p + "self_attn.q_proj.weight", {QD, H}},
                             {p + "self_attn.k_proj.weight", {KD, H}},
                             {p + "self_attn.v_proj.weight", {KD, H}}}, true);
    L.qkv_bias = load_fused({{p + "self_attn.q_proj.bias", {QD}},
                             {p + "self_attn.k_proj.bias", {KD}},
                             {p + "self_attn.v_proj.bias", {KD}}}, m.qkv_bias);
    L.o_proj = load_weight(p + "self_attn.o_proj.weight", {H, QD}, true);
    L.o_bias = load_weight(p + "self_attn.o_proj.bias", {H}, m.o_bias);
    L.post_attention_norm = load_weight(p + "post_attention_layernorm.weight", {H}, true);
    L.gate_up_proj = load_fused({{p + "mlp.gate_proj.weight", {I, H}}, {p + "mlp.up_proj.weight", {I, H}}}, true);
    L.gate_up_bias = load_fused({{p + "mlp.gate_proj.bias", {I}}, {p + "mlp.up_proj.bias", {I}}}, m.mlp_bias);
    L.down_proj = load_weight(p + "mlp.down_proj.weight", {H, I}, true);
    L.down_bias = load_weight(p + "mlp.down_proj.bias", {H}, m.mlp_bias);
  }
}

// inv_freq[i] = theta^(-2i/head_dim), rescaled for linear and Llama-3 scaling as transformers does.
void Engine::Impl::build_rope_table() {
  const int half = model.head_dim / 2;
  auto buf = device->allocate(sizeof(float) * size_t(half), "rope inv_freq");
  float* inv = static_cast<float*>(buf->data());
  const RopeScaling& rs = model.rope_scaling;
  for (int i = 0; i < half; ++i) {
    float f = 1.0f / std::pow(model.rope_theta, float(2 * i) / float(model.head_dim));
    if (rs.kind == RopeScalingKind::Linear) {
      f = f / rs.factor;
    } else if (rs.kind == RopeScalingKind::Llama3) {
      const float old_ctx = float(rs.original_max_position_embeddings);
      const float low_wavelen = old_ctx / rs.low_freq_factor;
      const float high_wavelen = old_ctx / rs.high_freq_factor;
      const float wavelen = 2.0f * float(M_PI) / f;
      if (wavelen > low_wavelen) {
        f = f / rs.factor;
      } else if (wavelen >= high_wavelen) {
        const float smooth = (old_ctx / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor);
        f = (1.0f - smooth) * f / rs.factor + smooth * f;
      }
    }
    inv[i] = f;
  }
  rope_inv_freq = BufferArg{buf.get(), 0};
  owned_buffers.push_back(std::move(buf));
}

std::unique_ptr<Engine> Engine::from_checkpoint(const std::string& dir, EngineConfig config) {
  auto impl = std::make_unique<Impl>();
  config.apply_env();
  if (config.block_size <= 0 || config.block_size > 1024)
    throw std::invalid_argument("block_size must be in 1..1024 (got " + std::to_string(config.block_size) + ")");
  impl->config = config;
  impl->model = ModelConfig::from_json(read_text_file(dir + "/config.json"), dir + "/config.json");
  impl->dtype = config.dtype == "auto" ? impl->model.checkpoint_dtype : dtype_from_string(config.dtype);
  impl->device = create_device(config);
  const bool on_cpu = impl->device->name() == "cpu";
  if (config.activation_dtype == "auto") {
    impl->act = !on_cpu && impl->dtype != DType::F32 ? impl->dtype : DType::F32;
  } else {
    impl->act = dtype_from_string(config.activation_dtype);
    if (impl->act != DType::F32 && on_cpu)
      throw std::invalid_argument("activation_dtype '" + config.activation_dtype +
                                  "': the cpu backend computes activations in float32 (use 'auto' or 'float32')");
    if (impl->act != DType::F32 && impl->act != impl->dtype)
      throw std::invalid_argument("activation_dtype '" + config.activation_dtype + "' with " +
                                  dtype_name(impl->dtype) + " weights: 16-bit activations take the weights' dtype "
                                  "(use 'auto', 'float32' or the weights' dtype)");
  }
  impl->checkpoint = SafetensorsCheckpoint::open(dir);
  impl->load_weights();
  if (!impl->weights_in_place) {  // every weight was converted: the mapped files are no longer needed
    impl->file_buffers.clear();
    impl->checkpoint.reset();
  }
  impl->build_rope_table();

  KVCacheShape kvs;
  kvs.num_layers = impl->model.num_layers;
  kvs.block_size = config.block_size;
  kvs.num_kv_heads = impl->model.num_kv_heads;
  kvs.head_dim = impl->model.head_dim;
  kvs.dtype = impl->dtype;
  kvs.num_blocks = config.num_kv_blocks > 0 ? config.num_kv_blocks
                                            : KVCacheShape::blocks_for_budget(config.kv_cache_memory_mb << 20, kvs);
  impl->kv = std::make_unique<PagedKVCache>(*impl->device, kvs);
  impl->scratch = std::make_unique<ScratchPool>(*impl->device, config.scratch_pool_mb << 20);

  // Every kernel the model needs, resolved once: <op>_<weight dtype> with f32 activations,
  // <op>_<weight dtype>_act_<weight dtype> with 16-bit ones.
  Device& d = *impl->device;
  const std::string w = dtype_name(impl->dtype);
  const std::string ax = impl->act == DType::F32 ? "" : "_act_" + w;
  impl->k.embedding = d.kernel("embedding_" + w + ax);
  impl->k.rms_norm = d.kernel("rms_norm_" + w + ax);
  impl->k.matmul = d.kernel("matmul_" + w + ax);
  impl->k.lm_head = d.kernel("matmul_" + w + ax + (ax.empty() ? "" : "_logits"));  // logits stay f32
  impl->k.rope = d.kernel("rope" + ax);
  impl->k.silu_mul = d.kernel("silu_mul" + ax);
  impl->k.kv_write = d.kernel("kv_write_" + w + ax);
  impl->k.paged_attention = d.kernel("paged_attention_" + w + ax);
  impl->k.gather_rows = d.kernel("gather_rows" + ax);
  impl->k.argmax = d.kernel("argmax");
  auto optional_kernel = [&](const std::string& name, Kernel& out) {
    const std::vector<std::string> names = d.kernel_names();
    if (std::find(names.begin(), names.end(), name) == names.end()) return false;
    out = d.kernel(name);
    return true;
  };
  const ModelConfig& mc = impl->model;
  const bool attention_tiles = mc.head_dim % 8 == 0 && mc.head_dim <= 128;
  impl->k.has_prefill_attention =
      attention_tiles && optional_kernel("paged_attention_prefill_" + w + ax, impl->k.paged_attention_prefill);
  impl->k.has_decode_attention =
      optional_kernel("paged_attention_decode_" + w + ax, impl->k.paged_attention_decode);
  impl->k.has_split_attention =
      optional_kernel("paged_attention_split_" + w + ax, impl->k.paged_attention_split) &&
      optional_kernel("paged_attention_reduce" + ax, impl->k.paged_attention_reduce);
  return std::unique_ptr<Engine>(new Engine(std::move(impl)));
}

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Engine::~Engine() = default;

const ModelConfig& Engine::model_config() const { return impl_->model; }
const EngineConfig& Engine::engine_config() const { return impl_->config; }
DType Engine::dtype() const { return impl_->dtype; }
DType Engine::activation_dtype() const { return impl_->act; }
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
      const int64_t slot = in.slot_mapping[size_t(q0 + i)];
      if (slot < 0) continue;
      impl_->kv->check_slot(slot);
      const int p = len - qlen + i;
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

// Lays out the step's buffers in `pool` and, unless the pool is only measuring, encodes the forward.
void Engine::Impl::encode_forward(const StepInput& in, ScratchPool& pool, bool greedy, BufferArg* logits_out,
                                  BufferArg* tokens_out) {
  const ModelConfig& m = model;
  const int T = in.num_tokens(), S = in.num_seqs(), R = int(in.logits_indices.size());
  const int H = m.hidden_size, I = m.intermediate_size, V = m.vocab_size, hd = m.head_dim;
  const int QD = m.num_heads * hd, KD = m.num_kv_heads * hd;
  const size_t f = sizeof(float), i32 = sizeof(int32_t);
  const size_t a = dtype_size(act);  // activations: f32, or the weights' 16-bit type

  BufferArg token_ids = pool.alloc(i32 * T, "token_ids");                                 // i32 [T]
  BufferArg positions = pool.alloc(i32 * T, "positions");                                 // i32 [T]
  BufferArg slots = pool.alloc(sizeof(int64_t) * T, "slot_mapping");                      // i64 [T]
  BufferArg qsl = pool.alloc(i32 * (S + 1), "query_start_loc");                           // i32 [S+1]
  BufferArg seq_lens = pool.alloc(i32 * S, "seq_lens");                                   // i32 [S]
  BufferArg block_tables = pool.alloc(i32 * in.block_tables.size(), "block_tables");      // i32 [S, W]
  BufferArg logit_rows = pool.alloc(i32 * std::max(R, 1), "logits_indices");              // i32 [R]
  BufferArg residual = pool.alloc(a * T * H, "residual");  // act [T, H]  the residual stream
  BufferArg h = pool.alloc(a * T * H, "h");                // act [T, H]  normed input / block output
  const int QKV = QD + 2 * KD;                             // a row of the fused q/k/v projection
  BufferArg qkv = pool.alloc(a * T * QKV, "qkv");          // act [T, QKV]: q | k | v per row
  const BufferArg q{qkv.buffer, qkv.offset};               //   [T, heads * hd]     (row stride QKV)
  const BufferArg kk{qkv.buffer, qkv.offset + a * QD};     //   [T, kv_heads * hd]  (row stride QKV)
  const BufferArg vv{qkv.buffer, qkv.offset + a * (QD + KD)};  // [T, kv_heads * hd] (row stride QKV)
  BufferArg attn = pool.alloc(a * T * QD, "attn");         // act [T, heads * hd]
  BufferArg gate_up = pool.alloc(a * T * 2 * I, "gate_up");  // act [T, 2I]: gate | up per row
  const BufferArg up{gate_up.buffer, gate_up.offset + a * I};  //   [T, I]         (row stride 2I)
  BufferArg act_mlp = pool.alloc(a * T * I, "silu(gate) * up");  // act [T, I]
  BufferArg sel_res = pool.alloc(a * std::max(R, 1) * H, "selected residual");  // act [R, H]
  BufferArg sel_h = pool.alloc(a * std::max(R, 1) * H, "selected h");           // act [R, H]
  BufferArg logits = pool.alloc(f * size_t(std::max(R, 1)) * V, "logits");      // f32 [R, V]
  BufferArg tokens = pool.alloc(i32 * std::max(R, 1), "greedy tokens");         // i32 [R]
  // Attention: the tiled prefill kernel when a chunk has many rows; split into partitions of keys (and
  // reduced) when a context is long; the one-threadgroup-per-row kernel otherwise (always, on cpu).
  int max_query_len = 0, max_seq_len = 0;
  for (int s = 0; s < S; ++s) {
    max_query_len = std::max(max_query_len, in.query_start_loc[size_t(s) + 1] - in.query_start_loc[size_t(s)]);
    max_seq_len = std::max(max_seq_len, in.seq_lens[size_t(s)]);
  }
  const bool prefill_attention = k.has_prefill_attention && max_query_len >= kPrefillAttentionMinRows;
  const bool split_attention = !prefill_attention && k.has_split_attention && max_seq_len > kAttentionPartition;
  // a pure decode step (one new token per sequence) writes K/V inside the attention kernel
  const bool decode_attention = !prefill_attention && !split_attention && k.has_decode_attention && max_query_len == 1;
  const int partitions = (max_seq_len + kAttentionPartition - 1) / kAttentionPartition;
  const size_t part_rows = split_attention ? size_t(T) * m.num_heads * partitions : 1;
  BufferArg part_max = pool.alloc(f * part_rows, "attention partition max");      // f32 [T, heads, P]
  BufferArg part_sum = pool.alloc(f * part_rows, "attention partition sum");      // f32 [T, heads, P]
  BufferArg part_out = pool.alloc(f * part_rows * hd, "attention partition out"); // f32 [T, heads, P, hd]
  *logits_out = logits;
  *tokens_out = tokens;
  if (!logits.buffer) return;  // measuring

  auto upload = [&](BufferArg dst, const void* src, size_t bytes) {
    if (bytes) std::memcpy(pool.host_ptr(dst), src, bytes);
  };
  upload(token_ids, in.token_ids.data(), i32 * T);
  upload(positions, in.positions.data(), i32 * T);
  upload(slots, in.slot_mapping.data(), sizeof(int64_t) * T);
  upload(qsl, in.query_start_loc.data(), i32 * (S + 1));
  upload(seq_lens, in.seq_lens.data(), i32 * S);
  upload(block_tables, in.block_tables.data(), i32 * in.block_tables.size());
  upload(logit_rows, in.logits_indices.data(), i32 * R);

  Device& d = *device;
  auto matmul = [&](BufferArg x, const Weight& w, const Weight& bias, BufferArg y, int rows) {
    MatmulArgs a{rows, int(w.shape[0]), int(w.shape[1]), bias.present() ? 1 : 0};
    d.dispatch(k.matmul, a, {x, w.arg, bias.arg, y});
  };
  auto rms_norm = [&](BufferArg x, BufferArg res, const Weight& w, BufferArg out, int rows, bool add) {
    RmsNormArgs a{rows, H, m.rms_norm_eps, add ? 1 : 0};
    d.dispatch(k.rms_norm, a, {x, add ? res : BufferArg{}, w.arg, out});
  };
  const float scale = 1.0f / std::sqrt(float(hd));

  // residual = embed(token_ids)                                            [T, H]
  d.dispatch(k.embedding, EmbeddingArgs{T, H, V}, {token_ids, embed_tokens.arg, residual});
  // h = RMSNorm(residual)
  rms_norm(residual, {}, layers[0].input_norm, h, T, false);
  for (int l = 0; l < m.num_layers; ++l) {
    const LayerWeights& L = layers[size_t(l)];
    // Self-attention: q, k, v projections, RoPE, write k, v to the paged cache, attend.
    matmul(h, L.qkv_proj, L.qkv_bias, qkv, T);                              // [T, QKV] = q | k | v
    d.dispatch(k.rope, RopeArgs{T, m.num_heads, m.num_kv_heads, hd, QKV, QKV}, {positions, rope_inv_freq, q, kk});
    const int window = m.layer_uses_sliding_window[size_t(l)] ? m.sliding_window : 0;
    PagedAttentionArgs pa{S, m.num_heads, m.num_kv_heads, hd, kv->block_size(), in.block_table_width, QKV, window, scale, T};
    if (!decode_attention)
      d.dispatch(k.kv_write, KVWriteArgs{T, m.num_kv_heads, hd, kv->block_size(), int(kv->num_slots()), QKV, QKV},
                 {kk, vv, slots, kv->key_cache(l), kv->value_cache(l)});
    if (decode_attention) {
      d.dispatch(k.paged_attention_decode, PagedAttentionDecodeArgs{pa, QKV, QKV, int(kv->num_slots())},
                 {q, kk, vv, slots, kv->key_cache(l), kv->value_cache(l), block_tables, qsl, seq_lens, attn});
    } else if (prefill_attention) {
      d.dispatch(k.paged_attention_prefill, PagedAttentionPrefillArgs{pa, max_query_len},
                 {q, kv->key_cache(l), kv->value_cache(l), block_tables, qsl, seq_lens, attn});
    } else if (split_attention) {
      d.dispatch(k.paged_attention_split, PagedAttentionSplitArgs{pa, kAttentionPartition, partitions},
                 {q, kv->key_cache(l), kv->value_cache(l), block_tables, qsl, seq_lens, part_max, part_sum, part_out});
      d.dispatch(k.paged_attention_reduce, PagedAttentionReduceArgs{T, m.num_heads, hd, partitions},
                 {part_max, part_sum, part_out, attn});
    } else {
      d.dispatch(k.paged_attention, pa, {q, kv->key_cache(l), kv->value_cache(l), block_tables, qsl, seq_lens, attn});
    }
    matmul(attn, L.o_proj, L.o_bias, h, T);                                 // [T, H]
    // residual += h;  h = RMSNorm(residual)
    rms_norm(h, residual, L.post_attention_norm, h, T, true);
    // SwiGLU MLP: down(silu(gate(h)) * up(h))
    matmul(h, L.gate_up_proj, L.gate_up_bias, gate_up, T);                  // [T, 2I] = gate | up
    d.dispatch(k.silu_mul, SiluMulArgs{T, I, 2 * I}, {gate_up, up, act_mlp});  // [T, I]
    matmul(act_mlp, L.down_proj, L.down_bias, h, T);                        // [T, H]
    if (l + 1 < m.num_layers)  // residual += h;  h = RMSNorm(residual) with the next layer's weight
      rms_norm(h, residual, layers[size_t(l) + 1].input_norm, h, T, true);
  }
  if (R == 0) return;
  // Only the rows that want logits go through the final norm and the LM head.
  d.dispatch(k.gather_rows, GatherRowsArgs{R, H}, {residual, logit_rows, sel_res});
  d.dispatch(k.gather_rows, GatherRowsArgs{R, H}, {h, logit_rows, sel_h});
  rms_norm(sel_h, sel_res, final_norm, sel_h, R, true);                     // [R, H]
  d.dispatch(k.lm_head, MatmulArgs{R, V, H, 0}, {sel_h, lm_head.arg, BufferArg{}, logits});  // f32 [R, V]
  if (greedy) d.dispatch(k.argmax, ArgmaxArgs{R, V}, {logits, tokens});                 // i32 [R]
}

void Engine::Impl::run_step(const StepInput& in, bool greedy, BufferArg* logits, BufferArg* tokens) {
  ScratchPool& pool = *scratch;
  pool.begin(/*measuring=*/true);
  encode_forward(in, pool, greedy, logits, tokens);
  pool.require(pool.used());
  pool.begin(false);
  Device& d = *device;
  d.begin_step();
  try {
    encode_forward(in, pool, greedy, logits, tokens);
    d.submit();
  } catch (...) {
    d.abandon_step();  // nothing of a step that failed to encode runs; the engine stays usable
    throw;
  }
  d.wait();
}

void Engine::step(const StepInput& in, float* logits) {
  validate(in);
  BufferArg out, tokens;
  impl_->run_step(in, false, &out, &tokens);
  const size_t n = in.logits_indices.size() * size_t(impl_->model.vocab_size);
  if (n) std::memcpy(logits, impl_->scratch->host_ptr(out), n * sizeof(float));
}

void Engine::step_greedy(const StepInput& in, int32_t* tokens) {
  validate(in);
  BufferArg logits, out;
  impl_->run_step(in, true, &logits, &out);
  const size_t n = in.logits_indices.size();
  if (n) std::memcpy(tokens, impl_->scratch->host_ptr(out), n * sizeof(int32_t));
}

std::vector<float> Engine::step(const StepInput& in) {
  std::vector<float> out(in.logits_indices.size() * size_t(impl_->model.vocab_size));
  step(in, out.data());
  return out;
}

}  // namespace metal_engine
