// Reads Hugging Face safetensors checkpoints (single file or sharded) by mmap: tensor data is used in
// place, never copied. Every offset and size in a header is checked against the file.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "metal_engine/dtype.h"
#include "metal_engine/quant.h"

namespace metal_engine {

class MappedFile {
 public:
  explicit MappedFile(const std::string& path);  // throws std::invalid_argument naming the path
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return static_cast<const uint8_t*>(data_); }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }
  // Drops the resident pages of [offset, offset + bytes) (whole pages inside it); they are read from the
  // file again if touched later. Used after a tensor was converted, so loading costs no extra memory.
  void release(size_t offset, size_t bytes) const;

 private:
  std::string path_;
  void* data_ = nullptr;
  size_t size_ = 0;
};

struct TensorInfo {
  std::string name;
  std::string dtype_str;          // as written in the header: "F32", "BF16", "I64", ...
  bool dtype_supported = false;   // F32, F16 or BF16
  DType dtype = DType::F32;       // valid when dtype_supported
  // A quantized weight (include/metal_engine/quant.h): stored as U8 [rows, row bytes] and named in the header's
  // __metadata__ as "quant.<tensor name>": "<format>"; `shape` is then the logical [rows, cols].
  QuantType quant = QuantType::None;
  std::vector<int64_t> shape;
  int file = 0;                   // index into Checkpoint::files()
  size_t offset = 0;              // absolute byte offset in that file
  size_t nbytes = 0;
};

class SafetensorsCheckpoint {
 public:
  // `dir` holds model.safetensors or model.safetensors.index.json (+ shards).
  static std::unique_ptr<SafetensorsCheckpoint> open(const std::string& dir);

  const TensorInfo* find(const std::string& name) const;
  const uint8_t* data(const TensorInfo& t) const { return files_[size_t(t.file)]->data() + t.offset; }
  const std::vector<std::unique_ptr<MappedFile>>& files() const { return files_; }
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }

 private:
  void add_file(const std::string& path);
  std::vector<std::unique_ptr<MappedFile>> files_;
  std::map<std::string, TensorInfo> tensors_;
};

std::string read_text_file(const std::string& path);  // throws std::invalid_argument if unreadable

}  // namespace metal_engine
