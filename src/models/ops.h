// The ops API the model files are written against: tensors in the step's scratch pool, weights, and one call
// per op (embedding, linear, rms_norm, rope, attention, activations, ...). Each call picks its kernel by op,
// weight dtype and activation dtype, fills the kernel's argument struct (metal/op_args.h) from the tensors'
// shapes and strides, and encodes it on the device. The engine core builds an Ops per step; a model's forward
// is a sequence of these calls and reads like its paper.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "metal_engine/device.h"
#include "metal_engine/dtype.h"
#include "metal_engine/kv_cache.h"
#include "metal_engine/quant.h"
#include "metal_engine/scratch_pool.h"
#include "metal_engine/step_input.h"
#include "rope.h"

namespace metal_engine::models {

// A 2-D view [rows, cols] of a buffer with a row stride (elements): a scratch tensor, or a column range of
// one (q, k and v inside the fused qkv rows).
struct Tensor {
  BufferArg arg;
  DType dtype = DType::F32;
  int rows = 0;
  int cols = 0;
  int stride = 0;  // elements from one row to the next (>= cols)

  // Columns [first, first + n) of every row (same rows, same stride).
  Tensor columns(int first, int n) const;
  bool contiguous() const { return stride == cols; }
};

// A weight on the device: a binding plus what it holds. Matrices are [out, in] (PyTorch's layout). A quantized
// weight (quant != None; linear, embedding and the MoE experts take them) is rows of blocks along `in`.
struct Weight {
  BufferArg arg;
  DType dtype = DType::F32;  // the float type (when not quantized)
  QuantType quant = QuantType::None;
  std::vector<int64_t> shape;
  bool present() const { return arg.buffer != nullptr; }
  bool quantized() const { return quant != QuantType::None; }
  // A fused weight whose parts are in different formats (a Q4_K_M file's q, k in Q4_K and v in Q6_K): each part
  // its own weight, rows stacked in order; `linear` runs one matmul per part into its columns of y.
  std::vector<Weight> parts;
  // kernel names' weight part: "q4_1", else "f16" etc.
  const char* format_name() const { return quantized() ? quant_info(quant).name : dtype_name(dtype); }
  int64_t rows() const { return shape.empty() ? 0 : shape[0]; }
  int64_t cols() const { return shape.size() > 1 ? shape[1] : 1; }
};

// One attention layer's shape.
struct AttentionParams {
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  float scale = 1.0f;      // applied to q . k
  int sliding_window = 0;  // 0: full causal attention; else a query at p sees keys p - window < j <= p
  float softcap = 0.0f;    // > 0: scores become softcap * tanh(score / softcap) (Gemma 2)
};

// Resolved kernels by name, shared by every step (pipelines are built once, on first use).
class KernelCache {
 public:
  explicit KernelCache(Device& d) : device_(d) {}
  const Kernel& get(const std::string& name);

 private:
  Device& device_;
  std::map<std::string, Kernel> kernels_;
};

// The rotary embedding of a model (or of one layer type): its parameters and, unless it depends on the
// step (dynamic NTK, longrope), its inverse-frequency table made once at load.
struct RotaryEmbedding {
  RopeParams params;
  Weight inv_freq;  // f32 [rotary_dim / 2] (absent when per_step)
};

class Ops {
 public:
  // The step's inputs, uploaded to the scratch pool by the engine core.
  struct StepTensors {
    BufferArg token_ids;        // i32 [T]
    BufferArg positions;        // i32 [T]
    BufferArg slot_mapping;     // i64 [T]
    BufferArg query_start_loc;  // i32 [S + 1]
    BufferArg seq_lens;         // i32 [S]
    BufferArg block_tables;     // i32 [S, W]
    BufferArg logits_indices;   // i32 [R]
    // A step fed by the previous one (StepInput::prev_token_rows): token_ids[t] = prev_tokens[prev_token_rows[t]]
    // where that row is >= 0, merged on the device just before the embedding reads token_ids, after every upload
    // of the step (a buffer a dispatch binds is the device's until the step is waited for).
    BufferArg prev_tokens;      // i32 [prev_rows]  the previous step's greedy tokens
    BufferArg prev_token_rows;  // i32 [T]
    int prev_rows = 0;
  };

  // num_heads, head_dim: the model's largest attention layer (sizes the split attention's partial results)
  Ops(Device& device, KernelCache& kernels, ScratchPool& pool, PagedKVCache& kv, DType act, const StepInput& in,
      const StepTensors& step, bool measuring, int num_heads, int head_dim);

  // ---- the step
  int num_tokens() const { return T_; }
  int num_seqs() const { return S_; }
  int num_logit_rows() const { return R_; }
  int max_position() const { return max_position_; }  // largest position among the step's tokens
  DType act_dtype() const { return act_; }

  // ---- scratch tensors: the pool is carved anew each step; a Scope hands back what was allocated inside it
  Tensor alloc_as(DType dtype, int rows, int cols, const char* label);
  Tensor alloc(int rows, int cols, const char* label);               // activation dtype
  Tensor alloc_f32(int rows, int cols, const char* label);
  Tensor alloc_i32(int rows, int cols, const char* label);
  class Scope {
   public:
    explicit Scope(Ops& ops) : pool_(ops.pool_), mark_(ops.pool_.used()) {}
    ~Scope() { pool_.reset_to(mark_); }
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    ScratchPool& pool_;
    size_t mark_;
  };

  // ---- ops (each encodes one or a few kernels; nothing runs before the step is submitted)
  // out[t] = table[token_ids[t]] * scale                            out [T, hidden]
  void embedding(const Weight& table, const Tensor& out, float scale = 1.0f);
  // y = x W^T (+ bias)                                 x [m, k], W [n, k], y [m, n] (rows may be strided)
  void linear(const Tensor& x, const Weight& w, const Weight& bias, const Tensor& y);
  Tensor linear(const Tensor& x, const Weight& w, const Weight& bias, const char* label);
  // The LM head: logits = x W^T in f32 whatever the activation dtype    x [R, k], logits f32 [R, vocab]
  Tensor logits(const Tensor& x, const Weight& w);
  // out = x / rms(x) * w                                             x, out [rows, dim] (out may be x)
  void rms_norm(const Tensor& x, const Weight& w, float eps, const Tensor& out);
  // residual += x; out = residual / rms(residual) * w                (out may be x)
  void add_rms_norm(const Tensor& x, const Tensor& residual, const Weight& w, float eps, const Tensor& out);
  // RMSNorm of every head of q [T, heads * hd] and k [T, kv_heads * hd] in place (Qwen3, Gemma 3)
  void qk_norm(const Tensor& q, const Tensor& k, const Weight& q_weight, const Weight& k_weight, int num_heads,
               int num_kv_heads, float eps);
  // The inverse frequencies of `rope` for this step: the table made at load, or (dynamic NTK, longrope) one
  // computed for the step's positions. Take it before the layers' Scopes: it is uploaded as it is made.
  Tensor rope_table(const RotaryEmbedding& rope);                             // f32 [1, rotary_dim / 2]
  // Rotates q [T, heads * hd] and k [T, kv_heads * hd] in place (the first rotary_dim dims of each head).
  void rope(const RotaryEmbedding& rope, const Tensor& table, const Tensor& q, const Tensor& k, int num_heads,
            int num_kv_heads);
  // Writes k, v [T, kv_heads * hd] to layer `layer` of the paged KV cache and attends:
  // out [T, heads * hd] = softmax(q k^T * scale, causal / windowed) v over each sequence's cached keys.
  void attention(int layer, const Tensor& q, const Tensor& k, const Tensor& v, const AttentionParams& p,
                 const Tensor& out);
  // out = silu(gate) * up, gate | up the two halves of each row of gate_up    gate_up [T, 2I], out [T, I]
  void silu_mul(const Tensor& gate_up, const Tensor& out);
  // out = gelu_tanh(gate) * up (GeGLU), as silu_mul
  void gelu_tanh_mul(const Tensor& gate_up, const Tensor& out);
  // A mixture-of-experts SwiGLU MLP (Mixtral, Qwen3-MoE): each token's top_k experts by router softmax
  // (renormalised to sum 1 when asked), their down(silu(gate(x)) * up(x)) weighted by those probabilities.
  // The router's logits are f32 whatever the activations (a 16-bit rounding would flip near-tied choices).
  // Rows are grouped by expert: each selected expert's weights are read once, the others not at all.
  // x, out [T, H] (out may be x); router [E, H]; gate_up [E * 2I, H] (expert e's gate | up at rows e * 2I);
  // down [E * H, I]
  void moe(const Tensor& x, const Weight& router, const Weight& gate_up, const Weight& down, int num_experts,
           int top_k, bool renormalize, const Tensor& out);
  // x = cap * tanh(x / cap) in place (Gemma 2's final logits)                  x f32 [rows, cols]
  void softcap(const Tensor& x, float cap);
  // The step's logit rows of x (logits_indices)                               x [T, cols] -> [R, cols]
  Tensor gather_logit_rows(const Tensor& x, const char* label);

 private:
  std::string kernel_name(const std::string& op, DType weight) const;  // <op>_<wdt>[_act_<adt>]
  std::string kernel_name(const std::string& op, const Weight& w) const;  // <op>_<wdt or format>[_act_<adt>]
  const Weight& float_weight(const Weight& w, const char* op) const;   // w, checked not to be quantized
  std::string act_suffix() const;                                        // "" or _act_<adt>
  void check_rows(const Tensor& t, const char* what) const;
  void gated_activation(const char* op, const Tensor& gate_up, const Tensor& out);
  Tensor linear_f32(const Tensor& x, const Weight& w, const char* label);  // y f32 whatever the activations
  // Encodes kernel `name` (resolving it even when only measuring: a load-time pass resolves every kernel).
  template <class Args>
  void run(const std::string& name, const Args& args, std::initializer_list<BufferArg> buffers) {
    const Kernel& k = kernels_.get(name);
    if (!measuring_) d_.dispatch(k, args, buffers);
  }

  Device& d_;
  KernelCache& kernels_;
  ScratchPool& pool_;
  PagedKVCache& kv_;
  DType act_;
  DeviceCaps caps_;
  const StepInput& in_;
  StepTensors step_;
  bool measuring_;
  int T_ = 0, S_ = 0, R_ = 0;
  int max_position_ = 0;
  // Attention: each sequence takes the kernel that suits it (vLLM splits decode rows and prefill chunks within
  // a batch): a long chunk the tiled prefill kernel, a long context the split-and-reduce one, one new token the
  // decode kernel fused with its KV write, anything else the one-threadgroup-per-row kernel (always, on cpu).
  // Consecutive sequences of one path form a group, dispatched as a step of its own: its rows, KV slots,
  // seq_lens and block tables bound at their offsets, its query_start_loc uploaded rebased to 0.
  enum class AttentionPath { PerRow, FusedDecode, Prefill, Split };
  struct AttentionGroup {
    int s0 = 0, s1 = 0;  // sequences [s0, s1)
    int t0 = 0, t1 = 0;  // their tokens [t0, t1)
    AttentionPath path = AttentionPath::PerRow;
    int max_query_len = 0;
    int partitions = 1;   // Split: key partitions of its longest context
    BufferArg query_start_loc;  // i32 [s1 - s0 + 1], rebased to t0 (the step's own when the group is the step)
  };
  std::vector<AttentionGroup> groups_;
  Tensor part_max_, part_sum_, part_out_;  // split attention's partial results, sized for the largest group
};

}  // namespace metal_engine::models
