// A small JSON reader for config.json, safetensors headers and index files. C++ programs embedding the
// core load checkpoints without Python, and no JSON library ships with every toolchain we target.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace metal_engine::json {

struct Value {
  enum class Kind { Null, Bool, Number, String, Array, Object } kind = Kind::Null;
  bool boolean = false;
  double number = 0.0;
  std::string string;
  std::vector<Value> array;
  std::map<std::string, Value> object;

  bool is_null() const { return kind == Kind::Null; }
  bool is_number() const { return kind == Kind::Number; }
  bool is_string() const { return kind == Kind::String; }
  bool is_object() const { return kind == Kind::Object; }
  bool is_array() const { return kind == Kind::Array; }
  // Member lookup on an object; nullptr if absent (or this is not an object).
  const Value* find(const std::string& key) const;
};

// Throws std::invalid_argument("<source>: invalid JSON at byte N: ...") on malformed text.
Value parse(const std::string& text, const std::string& source);

}  // namespace metal_engine::json
