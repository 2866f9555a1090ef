// Quantized weight formats: a property of a weight (models::Weight::quant), independent of the activation
// and KV-cache dtypes. The GGUF block formats as llama.cpp lays them out (ggml-common.h); rows are a whole
// number of blocks, blocks run along the input dimension. Kernels are named <op>_<format> (matmul_q4_1).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace metal_engine {

// A8: affine 8-bit in blocks of 32, {f16 d; f16 m; u8 qs[32]}, w = d * q + m: no GGUF type; MLX's 8-bit
// checkpoints are exactly this (their scale and bias per group repeated per 32).
// A6: affine 6-bit in blocks of 32, {f16 d; f16 m; u8 ql[16]; u8 qh[8]}, w = d * q + m with q's low 4 bits in
// ql as Q4_1 keeps them (byte i: weight i low, i + 16 high) and its top 2 bits of weight 8 t + l at bits 2t,
// 2t + 1 of qh[l]: MLX's 6-bit checkpoints, 7 bits a weight.
enum class QuantType : uint8_t { None, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, A8, A6 };

struct QuantInfo {
  const char* name;  // "q4_1": kernel names, safetensors metadata, the Python API
  int block_elems;   // weights per block (32, or 256 for the K-quants)
  int block_bytes;   // bytes per block
  int ggml_type;     // GGML_TYPE_* of the format (gguf-py's GGMLQuantizationType); -1: none (A8)
};

const QuantInfo& quant_info(QuantType q);
// Every format the engine runs (not None).
const std::vector<QuantType>& quant_types();
// "q4_1" / "Q4_1" -> Q4_1; throws std::invalid_argument naming the formats it knows.
QuantType quant_from_string(const std::string& s);
// Bytes of one row of `cols` weights; throws std::invalid_argument when cols is not a whole number of blocks.
int64_t quant_row_bytes(QuantType q, int64_t cols);

}  // namespace metal_engine
