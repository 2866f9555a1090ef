#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <string>
#include <sys/stat.h>

#include "core/safetensors.h"

using namespace metal_engine;

static std::string make_dir() {
  char tmpl[] = "/tmp/me_st_XXXXXX";
  return std::string(mkdtemp(tmpl));
}

static void write_safetensors(const std::string& path, const std::string& header, size_t data_bytes) {
  std::ofstream f(path, std::ios::binary);
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) f.put(char((n >> (8 * i)) & 0xff));
  f << header;
  for (size_t i = 0; i < data_bytes; ++i) f.put(char(i));
}

TEST(Safetensors, ReadsTensorsInPlace) {
  std::string dir = make_dir();
  write_safetensors(dir + "/model.safetensors",
                    R"({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
                        "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]}, "__metadata__": {}})",
                    32);
  auto ck = SafetensorsCheckpoint::open(dir);
  const TensorInfo* a = ck->find("a");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->dtype, DType::F32);
  EXPECT_EQ(a->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(ck->find("b")->dtype, DType::BF16);
  EXPECT_EQ(ck->data(*ck->find("b"))[0], 24);  // the bytes of the file itself
}

TEST(Safetensors, TruncatedAndCorrupt) {
  std::string dir = make_dir();
  write_safetensors(dir + "/model.safetensors", R"({"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}})", 16);
  EXPECT_THROW(SafetensorsCheckpoint::open(dir), std::invalid_argument);
  write_safetensors(dir + "/model.safetensors", R"({"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 16]}})", 16);
  try {
    SafetensorsCheckpoint::open(dir);
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("is corrupt"), std::string::npos) << e.what();
  }
  std::ofstream(dir + "/model.safetensors", std::ios::binary) << "\xff\xff\xff\xff\xff\xff\xff\xff{";
  EXPECT_THROW(SafetensorsCheckpoint::open(dir), std::invalid_argument);
  std::remove((dir + "/model.safetensors").c_str());
  EXPECT_THROW(SafetensorsCheckpoint::open(dir), std::invalid_argument);
}
