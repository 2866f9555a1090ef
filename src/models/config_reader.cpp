#include "config_reader.h"

#include <cmath>
#include <stdexcept>

namespace metal_engine::models {

void ConfigReader::fail(const std::string& what) const { throw std::invalid_argument(source_ + ": " + what); }

const json::Value* ConfigReader::find(const std::string& key) const {
  const json::Value* v = obj_->find(key);
  return (v && !v->is_null()) ? v : nullptr;
}

int ConfigReader::get_int(const std::string& key, int fallback) const {
  const json::Value* v = find(key);
  if (!v) return fallback;
  if (!v->is_number() || v->number != std::floor(v->number) || v->number < 0 || v->number > 2147483647.0)
    fail("field '" + key + "' must be a non-negative integer");
  return int(v->number);
}

int ConfigReader::require_int(const std::string& key) const {
  if (!find(key)) fail("missing required field '" + key + "'");
  return get_int(key, 0);
}

double ConfigReader::get_num(const std::string& key, double fallback) const {
  const json::Value* v = find(key);
  if (!v) return fallback;
  if (!v->is_number()) fail("field '" + key + "' must be a number");
  return v->number;
}

bool ConfigReader::get_bool(const std::string& key, bool fallback) const {
  const json::Value* v = find(key);
  if (!v) return fallback;
  if (v->kind != json::Value::Kind::Bool) fail("field '" + key + "' must be true or false");
  return v->boolean;
}

std::string ConfigReader::get_str(const std::string& key, const std::string& fallback) const {
  const json::Value* v = find(key);
  if (!v) return fallback;
  if (!v->is_string()) fail("field '" + key + "' must be a string");
  return v->string;
}

std::vector<double> ConfigReader::get_num_list(const std::string& key) const {
  const json::Value* v = find(key);
  std::vector<double> out;
  if (!v) return out;
  if (!v->is_array()) fail("field '" + key + "' must be a list of numbers");
  for (const json::Value& e : v->array) {
    if (!e.is_number()) fail("field '" + key + "' must be a list of numbers");
    out.push_back(e.number);
  }
  return out;
}

ConfigReader ConfigReader::child(const std::string& key) const {
  const json::Value* v = find(key);
  if (!v || !v->is_object()) fail("field '" + key + "' must be an object");
  return ConfigReader(*v, source_ + " (" + key + ")");
}

void ConfigReader::expect_one_of(const std::string& key, const std::vector<std::string>& allowed) const {
  const json::Value* v = find(key);
  if (!v) return;
  std::string s = v->is_string() ? v->string : std::string("<not a string>");
  std::string all;
  for (const std::string& a : allowed) {
    if (s == a) return;
    all += (all.empty() ? "'" : ", '") + a + "'";
  }
  fail(key + " '" + s + "' is not supported (supported: " + all + ")");
}

}  // namespace metal_engine::models
