// Typed reads of config.json fields, each error naming the file and the field. Shared by every model file.
#pragma once
#include <string>
#include <vector>

#include "../core/json.h"

namespace metal_engine::models {

class ConfigReader {
 public:
  ConfigReader(const json::Value& object, std::string source) : obj_(&object), source_(std::move(source)) {}

  const std::string& source() const { return source_; }
  // Throws std::invalid_argument("<source>: <what>").
  [[noreturn]] void fail(const std::string& what) const;

  bool has(const std::string& key) const { return find(key) != nullptr; }
  // The member, or nullptr when absent or null.
  const json::Value* find(const std::string& key) const;
  int get_int(const std::string& key, int fallback) const;           // a non-negative integer
  int require_int(const std::string& key) const;
  double get_num(const std::string& key, double fallback) const;
  bool get_bool(const std::string& key, bool fallback) const;
  std::string get_str(const std::string& key, const std::string& fallback = "") const;
  std::vector<double> get_num_list(const std::string& key) const;    // [] when absent
  // A nested object (e.g. rope_parameters) read with the same error context; nullptr-safe via has().
  ConfigReader child(const std::string& key) const;
  // Fails naming `key` when it is present and not one of `allowed` (a field we cannot honour).
  void expect_one_of(const std::string& key, const std::vector<std::string>& allowed) const;

 private:
  const json::Value* obj_;
  std::string source_;
};

}  // namespace metal_engine::models
