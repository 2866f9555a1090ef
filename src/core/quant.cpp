#include "metal_engine/quant.h"

#include <algorithm>
#include <cctype>
#include <stdexcept>

namespace metal_engine {

const QuantInfo& quant_info(QuantType q) {
  // name, weights per block, bytes per block, GGML type (ggml-common.h: block_q8_0, block_q4_0, ...)
  static const QuantInfo table[] = {
      {"none", 1, 0, -1},    {"q8_0", 32, 34, 8},    {"q4_0", 32, 18, 2},    {"q4_1", 32, 20, 3},
      {"q5_0", 32, 22, 6},   {"q5_1", 32, 24, 7},    {"q4_k", 256, 144, 12}, {"q5_k", 256, 176, 13},
      {"q6_k", 256, 210, 14}, {"a8", 32, 36, -1},  {"a6", 32, 28, -1},
  };
  return table[size_t(q)];
}

const std::vector<QuantType>& quant_types() {
  static const std::vector<QuantType> all{QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1, QuantType::Q5_0,
                                          QuantType::Q5_1, QuantType::Q4_K, QuantType::Q5_K, QuantType::Q6_K,
                                          QuantType::A8,   QuantType::A6};
  return all;
}

QuantType quant_from_string(const std::string& raw) {
  std::string s = raw;
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return char(std::tolower(c)); });
  std::string known;
  for (QuantType q : quant_types()) {
    if (s == quant_info(q).name) return q;
    known += std::string(known.empty() ? "" : ", ") + quant_info(q).name;
  }
  throw std::invalid_argument("unknown quantized weight format '" + raw + "': metal_engine runs " + known);
}

int64_t quant_row_bytes(QuantType q, int64_t cols) {
  const QuantInfo& i = quant_info(q);
  if (q == QuantType::None || cols % i.block_elems != 0)
    throw std::invalid_argument(std::string("a ") + i.name + " row of " + std::to_string(cols) +
                                " weights is not a whole number of " + std::to_string(i.block_elems) +
                                "-weight blocks");
  return cols / i.block_elems * i.block_bytes;
}

}  // namespace metal_engine
