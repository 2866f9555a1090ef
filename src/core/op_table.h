// Every op of the engine, declared once: its name, its argument struct (metal/op_args.h, bound at buffer(0) on
// Metal), how many buffers follow it, and the kernel flavours it has. From this table come the cpu backend's
// registration checks, the Metal backend's kernel specs (src/metal/metal_kernels.cpp), the `run` bindings of
// _core.ops and _core.metal_sim, and the op list the tests check themselves against (_core.ops.op_table()).
//
// Adding an op: its args struct in metal/op_args.h, its cpu kernel (src/cpu/kernels/<op>.cpp), its MSL kernel
// (metal/<op>.metal), its test case (tests/python/ops/test_<op>.py and the metal-sim suites), one line here.
#pragma once
#include <cstddef>
#include <string>
#include <vector>

#include "../../metal/op_args.h"
#include "metal_engine/quant.h"

namespace metal_engine {

// The kernels an op has, by the dtypes in their names:
//   Weight:     <op>_<wdt> for wdt f32, f16, bf16 (weights or KV cache), and on Metal <op>_<wdt>_act_<wdt>
//   Activation: <op>, and on Metal <op>_act_f16, <op>_act_bf16
//   Single:     <op> alone (f32 in, f32 out)
// metal_only: kernels only the Metal backend has (its other attention paths).
// quantized: the op also takes quantized weights (include/metal_engine/quant.h): <op>_<q> for each format q,
// and with 16-bit activations <op>_<q>_act_<adt>.
enum class OpFlavour { Weight, Activation, Single };

// X(op, Args, buffers, flavour, metal_only, quantized, writes): writes is a bit mask of the buffers (0 = the first
// after the args struct) the op writes; the Metal backend puts a barrier only before a dispatch that reads or writes
// what an earlier dispatch since the last barrier wrote, or writes what one read.
#define ME_OPS(X)                                                                           \
  X(embedding, EmbeddingArgs, 3, Weight, false, true, 0x4)                                  \
  X(rms_norm, RmsNormArgs, 4, Weight, false, false, 0xA)                                    \
  X(matmul, MatmulArgs, 4, Weight, false, true, 0x8)                                        \
  X(qk_norm, QKNormArgs, 4, Weight, false, false, 0x3)                                      \
  X(rope, RopeArgs, 4, Activation, false, false, 0xC)                                       \
  X(silu_mul, SiluMulArgs, 3, Activation, false, false, 0x4)                                \
  X(gelu_tanh_mul, SiluMulArgs, 3, Activation, false, false, 0x4)                           \
  X(kv_write, KVWriteArgs, 5, Weight, false, false, 0x18)                                   \
  X(paged_attention, PagedAttentionArgs, 7, Weight, false, false, 0x40)                     \
  X(paged_attention_decode, PagedAttentionDecodeArgs, 10, Weight, true, false, 0x230)       \
  X(paged_attention_prefill, PagedAttentionPrefillArgs, 7, Weight, true, false, 0x40)       \
  X(paged_attention_split, PagedAttentionSplitArgs, 9, Weight, true, false, 0x1C0)          \
  X(paged_attention_reduce, PagedAttentionReduceArgs, 4, Activation, true, false, 0x8)      \
  X(gather_rows, GatherRowsArgs, 3, Activation, false, false, 0x4)                          \
  X(moe_route, MoeRouteArgs, 3, Single, false, false, 0x6)                                  \
  X(moe_matmul, MoeMatmulArgs, 4, Weight, false, true, 0x8)                                 \
  X(moe_combine, MoeCombineArgs, 3, Activation, false, false, 0x4)                          \
  X(softcap, SoftcapArgs, 2, Single, false, false, 0x2)                                     \
  X(argmax, ArgmaxArgs, 2, Single, false, false, 0x2)                                     \
  X(feed_tokens, FeedTokensArgs, 3, Single, false, false, 0x4)

// The fields of every argument struct, in declaration order: S(Args, F(field) F(field) ...). From it come the
// Python bindings (_core.ops.<Args>, every field read-write) and a compile-time check that the list misses no
// field (the listed fields' sizes add up to the struct's) and no struct of the op table. Adding an args struct
// is one line here.
#define ME_ARGS_STRUCTS(S)                                                                                    \
  S(EmbeddingArgs, F(num_tokens) F(hidden) F(vocab) F(scale))                                                 \
  S(RmsNormArgs, F(rows) F(dim) F(eps) F(add_residual))                                                       \
  S(MatmulArgs, F(m) F(n) F(k) F(has_bias) F(y_stride))                                                       \
  S(RopeArgs, F(num_tokens) F(num_heads) F(num_kv_heads) F(head_dim) F(rotary_dim) F(q_stride) F(k_stride)    \
                  F(scaling))                                                                                 \
  S(QKNormArgs, F(num_tokens) F(num_heads) F(num_kv_heads) F(head_dim) F(q_stride) F(k_stride) F(eps))        \
  S(SiluMulArgs, F(rows) F(dim) F(in_stride))                                                                 \
  S(KVWriteArgs, F(num_tokens) F(num_kv_heads) F(head_dim) F(block_size) F(num_slots) F(k_stride)             \
                     F(v_stride))                                                                             \
  S(PagedAttentionArgs, F(num_seqs) F(num_heads) F(num_kv_heads) F(head_dim) F(block_size)                    \
                            F(block_table_width) F(q_stride) F(sliding_window) F(scale) F(num_tokens)         \
                                F(softcap))                                                                   \
  S(PagedAttentionDecodeArgs, F(attn) F(k_stride) F(v_stride) F(num_slots))                                   \
  S(PagedAttentionPrefillArgs, F(attn) F(max_query_len))                                                      \
  S(PagedAttentionSplitArgs, F(attn) F(partition_size) F(max_partitions))                                     \
  S(PagedAttentionReduceArgs, F(num_tokens) F(num_heads) F(head_dim) F(max_partitions))                       \
  S(GatherRowsArgs, F(rows) F(dim))                                                                           \
  S(MoeRouteArgs, F(num_tokens) F(num_experts) F(top_k) F(renormalize))                                       \
  S(MoeMatmulArgs, F(rows) F(n) F(k) F(num_experts) F(x_row_div))                                             \
  S(MoeCombineArgs, F(num_tokens) F(top_k) F(dim))                                                            \
  S(SoftcapArgs, F(rows) F(cols) F(cap))                                                                      \
  S(ArgmaxArgs, F(rows) F(vocab))                                                                             \
  S(FeedTokensArgs, F(num_tokens) F(num_src))

template <class Args>
struct ArgsFields;  // defined for every struct of ME_ARGS_STRUCTS
#define F(field) +sizeof(Args::field)
#define ME_ARGS_FIELDS_CHECK(Args_, fields)                                                                  \
  template <>                                                                                                \
  struct ArgsFields<Args_> {                                                                                 \
    using Args = Args_;                                                                                      \
    static_assert((0 fields) == sizeof(Args_), #Args_ " has a field its ME_ARGS_STRUCTS line does not list"); \
  };
ME_ARGS_STRUCTS(ME_ARGS_FIELDS_CHECK)
#undef ME_ARGS_FIELDS_CHECK
#undef F
#define ME_OP_ARGS_LISTED(op, Args, buffers, flavour, metal_only, quantized, writes) \
  static_assert(sizeof(ArgsFields<Args>) > 0, #Args " is missing from ME_ARGS_STRUCTS");
ME_OPS(ME_OP_ARGS_LISTED)
#undef ME_OP_ARGS_LISTED

struct OpInfo {
  const char* name;
  const char* args_name;  // the struct's name in op_args.h (and in _core.ops)
  size_t args_size;
  int num_buffers;
  OpFlavour flavour;
  bool metal_only;
  bool quantized;
  unsigned writes;  // bit i: the op writes buffer i (in-out buffers included)
};

inline const std::vector<OpInfo>& op_table() {
#define ME_OP_INFO(op, Args, buffers, flavour, metal_only, quantized, writes) \
  OpInfo{#op, #Args, sizeof(Args), buffers, OpFlavour::flavour, metal_only, quantized, writes},
  static const std::vector<OpInfo> table = {ME_OPS(ME_OP_INFO)};
#undef ME_OP_INFO
  return table;
}

// The largest argument struct and buffer count of any op: what a backend's recorded command must hold.
#define ME_OP_ARGS_SIZE(op, Args, buffers, flavour, metal_only, quantized, writes) sizeof(Args),
#define ME_OP_BUFFERS(op, Args, buffers, flavour, metal_only, quantized, writes) buffers,
constexpr size_t kOpArgsSizes[] = {ME_OPS(ME_OP_ARGS_SIZE)};
constexpr int kOpBufferCounts[] = {ME_OPS(ME_OP_BUFFERS)};
#undef ME_OP_ARGS_SIZE
#undef ME_OP_BUFFERS
constexpr size_t max_op_args_size() {
  size_t m = 0;
  for (size_t s : kOpArgsSizes) m = s > m ? s : m;
  return m;
}
constexpr int max_op_buffers() {
  int m = 0;
  for (int b : kOpBufferCounts) m = b > m ? b : m;
  return m;
}

inline const OpInfo* find_op(const std::string& name) {
  for (const OpInfo& op : op_table())
    if (name == op.name) return &op;
  return nullptr;
}

// The kernel names of an op on a backend: with_half_activations adds the Metal flavours (<op>_<wdt>_act_<wdt>,
// <op>_act_<adt>), with_quantized the quantized formats' (<op>_<q>[_act_<adt>]).
inline std::vector<std::string> op_kernel_names(const OpInfo& op, bool with_half_activations, bool with_quantized) {
  const std::string n = op.name;
  std::vector<std::string> v;
  switch (op.flavour) {
    case OpFlavour::Weight:
      for (const char* w : {"f32", "f16", "bf16"}) v.push_back(n + "_" + w);
      if (with_half_activations)
        for (const char* w : {"f16", "bf16"}) v.push_back(n + "_" + w + "_act_" + w);
      break;
    case OpFlavour::Activation:
      v.push_back(n);
      if (with_half_activations)
        for (const char* a : {"f16", "bf16"}) v.push_back(n + "_act_" + a);
      break;
    case OpFlavour::Single:
      v.push_back(n);
      break;
  }
  if (op.quantized && with_quantized)
    for (QuantType q : quant_types()) {
      v.push_back(n + "_" + quant_info(q).name);
      if (with_half_activations)
        for (const char* a : {"f16", "bf16"}) v.push_back(n + "_" + quant_info(q).name + "_act_" + a);
    }
  return v;
}

// The op a kernel name belongs to (the longest op name it starts with, followed by '_' or nothing); null if none.
inline const OpInfo* op_of_kernel(const std::string& kernel) {
  const OpInfo* best = nullptr;
  size_t best_len = 0;
  for (const OpInfo& op : op_table()) {
    const size_t n = std::char_traits<char>::length(op.name);
    if (kernel.compare(0, n, op.name) == 0 && (kernel.size() == n || kernel[n] == '_') && n > best_len) {
      best = &op;
      best_len = n;
    }
  }
  return best;
}

}  // namespace metal_engine
