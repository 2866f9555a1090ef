#include "safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <stdexcept>

#include "json.h"

namespace metal_engine {

MappedFile::MappedFile(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw std::invalid_argument("cannot open " + path + ": " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    throw std::invalid_argument("cannot stat " + path + ": " + std::strerror(errno));
  }
  size_ = size_t(st.st_size);
  if (size_ > 0) {
    data_ = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (data_ == MAP_FAILED) {
      data_ = nullptr;
      ::close(fd);
      throw std::invalid_argument("cannot mmap " + path + ": " + std::strerror(errno));
    }
  }
  ::close(fd);
}

void MappedFile::release(size_t offset, size_t bytes) const {
  const size_t page = size_t(::sysconf(_SC_PAGESIZE));
  size_t begin = (offset + page - 1) / page * page;
  size_t end = (offset + bytes) / page * page;
  if (data_ && end > begin) ::madvise(static_cast<char*>(data_) + begin, end - begin, MADV_DONTNEED);
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(data_, size_);
}

std::string read_text_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::invalid_argument("cannot read " + path);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

static bool file_exists(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::unique_ptr<SafetensorsCheckpoint> SafetensorsCheckpoint::open(const std::string& dir) {
  auto ck = std::unique_ptr<SafetensorsCheckpoint>(new SafetensorsCheckpoint());
  const std::string single = dir + "/model.safetensors";
  const std::string index = dir + "/model.safetensors.index.json";
  if (file_exists(index)) {
    json::Value root = json::parse(read_text_file(index), index);
    const json::Value* wm = root.find("weight_map");
    if (!wm || !wm->is_object() || wm->object.empty())
      throw std::invalid_argument(index + ": missing or empty 'weight_map'");
    std::set<std::string> shards;
    for (const auto& kv : wm->object) {
      if (!kv.second.is_string()) throw std::invalid_argument(index + ": weight_map values must be file names");
      const std::string& f = kv.second.string;
      if (f.find('/') != std::string::npos || f.find("..") != std::string::npos)
        throw std::invalid_argument(index + ": shard name '" + f + "' must be a plain file name");
      shards.insert(f);
    }
    for (const auto& s : shards) {
      if (!file_exists(dir + "/" + s))
        throw std::invalid_argument(index + " lists shard '" + s + "', which is missing from " + dir);
      ck->add_file(dir + "/" + s);
    }
    for (const auto& kv : wm->object)
      if (!ck->find(kv.first))
        throw std::invalid_argument(index + ": tensor '" + kv.first + "' is not in shard '" +
                                    kv.second.string + "'");
  } else if (file_exists(single)) {
    ck->add_file(single);
  } else {
    throw std::invalid_argument("no model.safetensors or model.safetensors.index.json in '" + dir +
                                "': pass a Hugging Face checkpoint folder");
  }
  return ck;
}

const TensorInfo* SafetensorsCheckpoint::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

static size_t element_size(const std::string& dt) {
  if (dt == "F64" || dt == "I64" || dt == "U64") return 8;
  if (dt == "F32" || dt == "I32" || dt == "U32") return 4;
  if (dt == "F16" || dt == "BF16" || dt == "I16" || dt == "U16") return 2;
  if (dt == "I8" || dt == "U8" || dt == "BOOL" || dt == "F8_E4M3" || dt == "F8_E5M2") return 1;
  return 0;
}

void SafetensorsCheckpoint::add_file(const std::string& path) {
  auto file = std::make_unique<MappedFile>(path);
  const size_t size = file->size();
  if (size < 8)
    throw std::invalid_argument(path + " is truncated or not a safetensors file (" + std::to_string(size) +
                                " bytes)");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | file->data()[i];
  if (header_len == 0 || header_len > size - 8)
    throw std::invalid_argument(path + " is truncated or corrupt: its header claims " +
                                std::to_string(header_len) + " bytes but the file has " +
                                std::to_string(size) + "; re-download or re-save the checkpoint");
  std::string header(reinterpret_cast<const char*>(file->data()) + 8, size_t(header_len));
  json::Value root = json::parse(header, path + " (safetensors header)");
  if (!root.is_object()) throw std::invalid_argument(path + ": safetensors header is not a JSON object");
  const size_t data_start = 8 + size_t(header_len);
  const size_t data_size = size - data_start;
  const int file_index = int(files_.size());
  std::map<std::string, std::string> quantized;  // tensor -> format, from __metadata__'s "quant.<tensor>"
  if (const json::Value* meta = root.find("__metadata__"); meta && meta->is_object())
    for (const auto& kv : meta->object)
      if (kv.first.rfind("quant.", 0) == 0 && kv.second.is_string()) quantized[kv.first.substr(6)] = kv.second.string;
  for (const auto& kv : root.object) {
    if (kv.first == "__metadata__") continue;
    const json::Value& e = kv.second;
    const json::Value* dt = e.find("dtype");
    const json::Value* shape = e.find("shape");
    const json::Value* offs = e.find("data_offsets");
    if (!dt || !dt->is_string() || !shape || !shape->is_array() || !offs || !offs->is_array() ||
        offs->array.size() != 2 || !offs->array[0].is_number() || !offs->array[1].is_number())
      throw std::invalid_argument(path + ": corrupt header entry for tensor '" + kv.first + "'");
    TensorInfo t;
    t.name = kv.first;
    t.dtype_str = dt->string;
    t.file = file_index;
    size_t esize = element_size(t.dtype_str);
    if (esize == 0) throw std::invalid_argument(path + ": tensor '" + kv.first + "' has unknown dtype '" +
                                                t.dtype_str + "'");
    t.dtype_supported = t.dtype_str == "F32" || t.dtype_str == "F16" || t.dtype_str == "BF16";
    if (t.dtype_supported) t.dtype = dtype_from_string(t.dtype_str);
    size_t numel = 1;
    for (const auto& d : shape->array) {
      if (!d.is_number() || d.number < 0) throw std::invalid_argument(path + ": bad shape for '" + kv.first + "'");
      t.shape.push_back(int64_t(d.number));
      numel *= size_t(d.number);
    }
    double b = offs->array[0].number, en = offs->array[1].number;
    if (b < 0 || en < b) throw std::invalid_argument(path + ": bad data_offsets for '" + kv.first + "'");
    if (size_t(en) > data_size)
      throw std::invalid_argument(path + " is truncated: tensor '" + kv.first + "' ends at byte " +
                                  std::to_string(size_t(en) + data_start) + " but the file has " +
                                  std::to_string(size) + "; re-download or re-save the checkpoint");
    t.offset = data_start + size_t(b);
    t.nbytes = size_t(en - b);
    if (t.nbytes != numel * esize)
      throw std::invalid_argument(path + " is corrupt: tensor '" + kv.first + "' holds " +
                                  std::to_string(t.nbytes) + " bytes but its shape and dtype need " +
                                  std::to_string(numel * esize));
    if (auto q = quantized.find(t.name); q != quantized.end()) {
      try {
        t.quant = quant_from_string(q->second);
      } catch (const std::invalid_argument& err) {
        throw std::invalid_argument(path + ": tensor '" + t.name + "': " + err.what());
      }
      const QuantInfo& qi = quant_info(t.quant);
      if (t.dtype_str != "U8" || t.shape.size() != 2 || t.shape[1] % qi.block_bytes != 0)
        throw std::invalid_argument(path + ": quantized tensor '" + t.name + "' must be U8 [rows, whole " + qi.name +
                                    " blocks of " + std::to_string(qi.block_bytes) + " bytes]; it is " + t.dtype_str +
                                    " " + [&] {
                                      std::string d;
                                      for (int64_t x : t.shape) d += (d.empty() ? "[" : ", ") + std::to_string(x);
                                      return d + "]";
                                    }());
      t.shape[1] = t.shape[1] / qi.block_bytes * qi.block_elems;
      quantized.erase(q);
    }
    if (tensors_.count(t.name))
      throw std::invalid_argument(path + ": tensor '" + t.name + "' appears in more than one shard");
    tensors_[t.name] = t;
  }
  if (!quantized.empty())
    throw std::invalid_argument(path + ": __metadata__ names quantized tensor '" + quantized.begin()->first +
                                "', which the file does not hold");
  files_.push_back(std::move(file));
}

}  // namespace metal_engine
