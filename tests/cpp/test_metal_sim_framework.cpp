// metal-sim's stand-in for the Metal framework, driven through metal-cpp exactly as the Metal backend drives
// it (compiled with clang, like src/metal/metal_device.cpp): libraries from a metallib and from source,
// pipelines, shared and no-copy buffers, one command buffer with barriers, commit and wait; and each thing
// it refuses, as a Metal device would (or as our engine forbids), with an error that names it.
#define NS_PRIVATE_IMPLEMENTATION
#define MTL_PRIVATE_IMPLEMENTATION
#include <Foundation/Foundation.hpp>
#include <Metal/Metal.hpp>
#include <gtest/gtest.h>

#include <cstdlib>
#include <sys/mman.h>

#include <cmath>
#include <string>
#include <vector>

#include "../../metal/op_args.h"
#include "metal_kernels.h"
#include "metal_sim/framework/refusal.h"

using metal_engine::SiluMulArgs;
using metal_sim::Refusal;

namespace {

NS::String* str(const char* s) { return NS::String::string(s, NS::UTF8StringEncoding); }

class MetalSimFramework : public ::testing::Test {
 protected:
  void SetUp() override {
    pool_ = NS::AutoreleasePool::alloc()->init();
    device_ = MTL::CreateSystemDefaultDevice();
    ASSERT_NE(device_, nullptr);
    NS::Error* error = nullptr;
    library_ = device_->newLibrary(NS::URL::fileURLWithPath(str(ME_TEST_METALLIB)), &error);
    ASSERT_NE(library_, nullptr) << (error ? error->localizedDescription()->utf8String() : "");
    MTL::Function* f = library_->newFunction(str("silu_mul"));
    ASSERT_NE(f, nullptr);
    pipeline_ = device_->newComputePipelineState(f, &error);
    f->release();
    ASSERT_NE(pipeline_, nullptr);
    queue_ = device_->newCommandQueue();
  }
  void TearDown() override {
    queue_->release();
    pipeline_->release();
    library_->release();
    device_->release();
    pool_->release();
  }

  MTL::Buffer* filled(int n, float start) {
    MTL::Buffer* b = device_->newBuffer(sizeof(float) * size_t(n), MTL::ResourceStorageModeShared);
    for (int i = 0; i < n; ++i) static_cast<float*>(b->contents())[i] = start + 0.25f * float(i);
    return b;
  }

  // out = silu(gate) * up over n elements, encoded on `enc` (then a memory barrier unless barrier is false)
  void encode_silu_mul(MTL::ComputeCommandEncoder* enc, MTL::Buffer* gate, MTL::Buffer* up, MTL::Buffer* out, int n,
                       bool barrier = true) {
    SiluMulArgs a{1, n, n};
    enc->setComputePipelineState(pipeline_);
    enc->setBytes(&a, sizeof(a), 0);
    enc->setBuffer(gate, 0, 1);
    enc->setBuffer(up, 0, 2);
    enc->setBuffer(out, 0, 3);
    enc->dispatchThreadgroups(MTL::Size((NS::UInteger(n) + 255) / 256, 1, 1), MTL::Size(256, 1, 1));
    if (barrier) enc->memoryBarrier(MTL::BarrierScopeBuffers);
  }

  NS::AutoreleasePool* pool_ = nullptr;
  MTL::Device* device_ = nullptr;
  MTL::Library* library_ = nullptr;
  MTL::ComputePipelineState* pipeline_ = nullptr;
  MTL::CommandQueue* queue_ = nullptr;
};

float silu_mul(float g, float u) { return g / (1.0f + std::exp(-g)) * u; }

TEST_F(MetalSimFramework, RunsAStepOfTwoDependentDispatches) {
  const int n = 300;
  MTL::Buffer *gate = filled(n, -3.0f), *up = filled(n, 0.5f), *mid = filled(n, 0.0f), *out = filled(n, 0.0f);
  MTL::CommandBuffer* cb = queue_->commandBuffer();
  MTL::ComputeCommandEncoder* enc = cb->computeCommandEncoder(MTL::DispatchTypeConcurrent);
  encode_silu_mul(enc, gate, up, mid, n);
  encode_silu_mul(enc, mid, up, out, n);  // reads what the first wrote, after the barrier
  enc->endEncoding();
  cb->commit();
  cb->waitUntilCompleted();
  EXPECT_EQ(cb->status(), MTL::CommandBufferStatusCompleted);
  const float* g = static_cast<float*>(gate->contents());
  const float* u = static_cast<float*>(up->contents());
  const float* o = static_cast<float*>(out->contents());
  for (int i = 0; i < n; ++i) EXPECT_NEAR(o[i], silu_mul(silu_mul(g[i], u[i]), u[i]), 1e-5f) << i;
  for (MTL::Buffer* b : {gate, up, mid, out}) b->release();
}

// Dispatches of a concurrent encoder with no barrier between them run interleaved, threadgroup by threadgroup
// (last-to-first with METAL_SIM_REVERSE_ORDER=1, else in a seeded random order): the second of two dependent
// dispatches then reads the first's output before it is written. With the barrier, or on a serial encoder, it
// never does.
TEST_F(MetalSimFramework, DispatchesWithNoBarrierBetweenThemRunInterleaved) {
  const int n = 300;  // two threadgroups each
  auto run = [&](MTL::DispatchType type, bool barrier) {
    MTL::Buffer *gate = filled(n, -3.0f), *up = filled(n, 0.5f), *mid = filled(n, 0.0f), *out = filled(n, 0.0f);
    MTL::CommandBuffer* cb = queue_->commandBuffer();
    MTL::ComputeCommandEncoder* enc = cb->computeCommandEncoder(type);
    encode_silu_mul(enc, gate, up, mid, n, barrier);
    encode_silu_mul(enc, mid, up, out, n);
    enc->endEncoding();
    cb->commit();
    cb->waitUntilCompleted();
    int wrong = 0;
    for (int i = 0; i < n; ++i) {
      const float g = static_cast<float*>(gate->contents())[i], u = static_cast<float*>(up->contents())[i];
      wrong += std::abs(static_cast<float*>(out->contents())[i] - silu_mul(silu_mul(g, u), u)) > 1e-5f;
    }
    for (MTL::Buffer* b : {gate, up, mid, out}) b->release();
    return wrong;
  };
  setenv("METAL_SIM_REVERSE_ORDER", "1", 1);
  EXPECT_EQ(run(MTL::DispatchTypeConcurrent, false), n);  // the second ran first: it read mid's zeros
  EXPECT_EQ(run(MTL::DispatchTypeConcurrent, true), 0);
  EXPECT_EQ(run(MTL::DispatchTypeSerial, false), 0);
  unsetenv("METAL_SIM_REVERSE_ORDER");
  int any_wrong = 0;  // a seeded random order: some seed interleaves them badly
  for (const char* seed : {"0", "1", "2", "3"}) {
    setenv("METAL_SIM_SEED", seed, 1);
    any_wrong += run(MTL::DispatchTypeConcurrent, false) > 0;
    EXPECT_EQ(run(MTL::DispatchTypeConcurrent, true), 0);
  }
  unsetenv("METAL_SIM_SEED");
  EXPECT_GT(any_wrong, 0);
}

TEST_F(MetalSimFramework, LibraryFromSourceOffersTheKernelsItNames) {
  NS::Error* error = nullptr;
  MTL::Library* lib = device_->newLibrary(str(metal_engine::kMetalKernelSource), nullptr, &error);
  ASSERT_NE(lib, nullptr);
  MTL::Function* f = lib->newFunction(str("matmul_gemm_f16"));
  EXPECT_NE(f, nullptr);
  if (f) f->release();
  EXPECT_EQ(lib->newFunction(str("no_such_kernel")), nullptr);  // as Metal: nil for an unknown name
  lib->release();
  // a source naming a kernel metal-sim never compiled fails with an error, not a library
  EXPECT_EQ(device_->newLibrary(str("kernel void brand_new(device float* x [[buffer(0)]]) {}"), nullptr, &error), nullptr);
  ASSERT_NE(error, nullptr);
  EXPECT_NE(std::string(error->localizedDescription()->utf8String()).find("brand_new"), std::string::npos);
  // a file that is no metallib
  EXPECT_EQ(device_->newLibrary(NS::URL::fileURLWithPath(str("/etc/hostname")), &error), nullptr);
}

// The embedded source is the text the kernels were built from, section by section (tools/metal_prepass.py
// registers each file's hash); one changed character in one file's section, or a section for a file metal-sim
// never compiled, and newLibraryWithSource: refuses it naming the file.
TEST_F(MetalSimFramework, LibraryFromSourceIsTheSourceTheKernelsWereBuiltFrom) {
  const std::string source = metal_engine::kMetalKernelSource;
  for (const char* file : {"op_args.h", "quant_blocks.h", "matmul.metal", "matmul_quant.metal", "moe.metal"})
    EXPECT_NE(source.find(std::string("\n// ---- ") + file + " ----\n"), std::string::npos) << file;
  NS::Error* error = nullptr;
  std::string stale = source;
  const size_t at = stale.find("kQGemvRows = 4");
  ASSERT_NE(at, std::string::npos);
  stale[at + 13] = '8';  // matmul_quant.metal, edited after the build
  EXPECT_EQ(device_->newLibrary(str(stale.c_str()), nullptr, &error), nullptr);
  ASSERT_NE(error, nullptr);
  EXPECT_NE(std::string(error->localizedDescription()->utf8String()).find("matmul_quant.metal is not the text"),
            std::string::npos);
  const std::string extra = source + "\n// ---- brand_new.metal ----\nkernel void brand_new() {}\n";
  EXPECT_EQ(device_->newLibrary(str(extra.c_str()), nullptr, &error), nullptr);
  EXPECT_NE(std::string(error->localizedDescription()->utf8String()).find("brand_new.metal"), std::string::npos);
}

TEST_F(MetalSimFramework, NoCopyBufferIsTheHostMemory) {
  const size_t bytes = 2 * 4096;
  void* mem = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  MTL::Buffer* b = device_->newBuffer(mem, bytes, MTL::ResourceStorageModeShared, nullptr);
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->contents(), mem);
  EXPECT_EQ(b->length(), bytes);
  b->release();
  // not page-aligned: nil, as Metal
  EXPECT_EQ(device_->newBuffer(static_cast<char*>(mem) + 64, 4096, MTL::ResourceStorageModeShared, nullptr), nullptr);
  ::munmap(mem, bytes);
}

TEST_F(MetalSimFramework, RefusesABufferBindingOutOfRange) {
  MTL::Buffer* b = filled(16, 0.0f);
  MTL::ComputeCommandEncoder* enc = queue_->commandBuffer()->computeCommandEncoder();
  EXPECT_THROW(enc->setBuffer(b, 64, 1), Refusal);  // offset at the end of a 64-byte buffer
  EXPECT_THROW(enc->setBuffer(b, 0, 31), Refusal);  // index past the 31 buffer slots
  std::vector<char> big(4097);
  EXPECT_THROW(enc->setBytes(big.data(), big.size(), 0), Refusal);
  try {
    enc->setBuffer(b, 100, 2);
  } catch (const Refusal& e) {
    EXPECT_NE(std::string(e.what()).find("out of range"), std::string::npos) << e.what();
  }
  enc->endEncoding();
  b->release();
}

TEST_F(MetalSimFramework, RefusesTooMuchThreadgroupMemoryAndTooManyThreads) {
  MTL::Buffer *g = filled(8, 0.0f), *u = filled(8, 0.0f), *o = filled(8, 0.0f);
  MTL::ComputeCommandEncoder* enc = queue_->commandBuffer()->computeCommandEncoder();
  encode_silu_mul(enc, g, u, o, 8);
  EXPECT_THROW(enc->setThreadgroupMemoryLength(100, 0), Refusal);  // not a multiple of 16
  enc->setThreadgroupMemoryLength(16384, 0);
  enc->setThreadgroupMemoryLength(16400, 1);  // 32784 bytes in all: past the device's 32 KB
  EXPECT_THROW(enc->dispatchThreadgroups(MTL::Size(1, 1, 1), MTL::Size(32, 1, 1)), Refusal);
  enc->setThreadgroupMemoryLength(0, 1);
  EXPECT_GE(pipeline_->maxTotalThreadsPerThreadgroup(), 256u);
  EXPECT_THROW(enc->dispatchThreadgroups(MTL::Size(1, 1, 1), MTL::Size(pipeline_->maxTotalThreadsPerThreadgroup() + 1, 1, 1)),
               Refusal);
  EXPECT_THROW(enc->dispatchThreadgroups(MTL::Size(1, 1, 1), MTL::Size(32, 33, 1)), Refusal);  // 1056 threads
  enc->endEncoding();
  EXPECT_THROW(enc->dispatchThreadgroups(MTL::Size(1, 1, 1), MTL::Size(32, 1, 1)), Refusal);  // after endEncoding
  for (MTL::Buffer* b : {g, u, o}) b->release();
}

TEST_F(MetalSimFramework, RefusesADispatchWithNoPipeline) {
  MTL::ComputeCommandEncoder* enc = queue_->commandBuffer()->computeCommandEncoder();
  EXPECT_THROW(enc->dispatchThreadgroups(MTL::Size(1, 1, 1), MTL::Size(32, 1, 1)), Refusal);
  enc->endEncoding();
}

TEST_F(MetalSimFramework, RefusesAWaitInsideTheEncodePhase) {
  MTL::CommandBuffer* cb = queue_->commandBuffer();
  MTL::ComputeCommandEncoder* enc = cb->computeCommandEncoder();
  EXPECT_THROW(cb->waitUntilCompleted(), Refusal);  // never committed: a GPU would never finish it
  enc->endEncoding();
  EXPECT_THROW(cb->waitUntilCompleted(), Refusal);
  cb->commit();
  cb->waitUntilCompleted();
  EXPECT_THROW(cb->commit(), Refusal);  // committed before
}

TEST_F(MetalSimFramework, RefusesAReadBackInsideAStep) {
  MTL::Buffer *g = filled(8, 1.0f), *u = filled(8, 1.0f), *o = filled(8, 0.0f), *other = filled(8, 0.0f);
  MTL::CommandBuffer* cb = queue_->commandBuffer();
  MTL::ComputeCommandEncoder* enc = cb->computeCommandEncoder();
  encode_silu_mul(enc, g, u, o, 8);
  EXPECT_THROW(o->contents(), Refusal);  // bound by a step still being encoded
  EXPECT_NE(other->contents(), nullptr);  // a buffer the step does not bind is the host's
  enc->endEncoding();
  cb->commit();
  try {
    o->contents();  // committed, not yet waited for
    ADD_FAILURE() << "read-back between commit and wait was not refused";
  } catch (const Refusal& e) {
    EXPECT_NE(std::string(e.what()).find("read-back inside a step"), std::string::npos) << e.what();
  }
  cb->waitUntilCompleted();
  EXPECT_NEAR(static_cast<float*>(o->contents())[0], silu_mul(1.0f, 1.0f), 1e-6f);
  for (MTL::Buffer* b : {g, u, o, other}) b->release();
}

TEST_F(MetalSimFramework, AKernelThatFailsFailsItsCommandBuffer) {
  NS::Error* error = nullptr;
  MTL::Library* lib = device_->newLibrary(
      str("kernel void return_before_barrier(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {}"),
      nullptr, &error);
  ASSERT_NE(lib, nullptr);
  MTL::Function* f = lib->newFunction(str("return_before_barrier"));
  MTL::ComputePipelineState* p = device_->newComputePipelineState(f, &error);
  MTL::Buffer* out = filled(64, 0.0f);
  MTL::CommandBuffer* cb = queue_->commandBuffer();
  MTL::ComputeCommandEncoder* enc = cb->computeCommandEncoder();
  enc->setComputePipelineState(p);
  enc->setBuffer(out, 0, 0);
  enc->dispatchThreadgroups(MTL::Size(1, 1, 1), MTL::Size(64, 1, 1));
  enc->endEncoding();
  cb->commit();
  cb->waitUntilCompleted();
  EXPECT_EQ(cb->status(), MTL::CommandBufferStatusError);
  ASSERT_NE(cb->error(), nullptr);
  EXPECT_NE(std::string(cb->error()->localizedDescription()->utf8String()).find("barrier"), std::string::npos);
  out->release();
  p->release();
  f->release();
  lib->release();
}

TEST_F(MetalSimFramework, FunctionConstantsSpecialiseAPipeline) {
  // rms_norm's [[function_constant(0)]] says whether to add the residual: no pipeline without it
  NS::Error* error = nullptr;
  MTL::Function* plain = library_->newFunction(str("rms_norm_f32"));
  ASSERT_NE(plain, nullptr);
  EXPECT_EQ(device_->newComputePipelineState(plain, &error), nullptr);
  ASSERT_NE(error, nullptr);
  EXPECT_NE(std::string(error->localizedDescription()->utf8String()).find("function constant 0"), std::string::npos);
  plain->release();
  const int rows = 2, dim = 40;
  for (bool add : {false, true}) {
    MTL::FunctionConstantValues* values = MTL::FunctionConstantValues::alloc()->init();
    values->setConstantValue(&add, MTL::DataTypeBool, NS::UInteger(0));
    MTL::Function* f = library_->newFunction(str("rms_norm_f32"), values, &error);
    values->release();
    ASSERT_NE(f, nullptr);
    MTL::ComputePipelineState* p = device_->newComputePipelineState(f, &error);
    ASSERT_NE(p, nullptr);
    MTL::Buffer *x = filled(rows * dim, -1.0f), *res = filled(rows * dim, 0.5f), *w = filled(dim, 1.0f);
    MTL::Buffer* out = filled(rows * dim, 0.0f);
    const metal_engine::RmsNormArgs a{rows, dim, 1e-6f, 0};  // the field is ignored: the constant decides
    MTL::CommandBuffer* cb = queue_->commandBuffer();
    MTL::ComputeCommandEncoder* enc = cb->computeCommandEncoder();
    enc->setComputePipelineState(p);
    enc->setBytes(&a, sizeof(a), 0);
    enc->setBuffer(x, 0, 1);
    enc->setBuffer(res, 0, 2);
    enc->setBuffer(w, 0, 3);
    enc->setBuffer(out, 0, 4);
    enc->dispatchThreadgroups(MTL::Size(rows, 1, 1), MTL::Size(64, 1, 1));
    enc->endEncoding();
    cb->commit();
    cb->waitUntilCompleted();
    const float* xs = static_cast<float*>(x->contents());
    const float* rs = static_cast<float*>(res->contents());
    const float* src = add ? rs : xs;  // after the kernel: residual += x when adding
    double ss = 0;
    for (int i = 0; i < dim; ++i) ss += double(src[i]) * src[i];
    const double inv = 1.0 / std::sqrt(ss / dim + 1e-6);
    EXPECT_NEAR(static_cast<float*>(out->contents())[3], src[3] * inv * static_cast<float*>(w->contents())[3], 1e-4);
    EXPECT_NEAR(rs[0], add ? 0.5f + -1.0f : 0.5f, 1e-6f);
    for (MTL::Buffer* b : {x, res, w, out}) b->release();
    p->release();
    f->release();
  }
}

TEST_F(MetalSimFramework, AnUnimplementedSelectorAbortsWithItsName) {
  EXPECT_DEATH(device_->newSharedEvent(), "newSharedEvent");
}

}  // namespace
