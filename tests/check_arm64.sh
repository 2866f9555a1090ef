#!/usr/bin/env bash
# Cross-compiles the C++ core for arm64 (NEON kernels) and runs under qemu: the GEMM tiles' check
# (tests/cpp/check_gemm_tiles.cpp) and the C++ example on a tiny random checkpoint, in f32 and f16 and with its
# matrices quantized (Q4_K with Q5_0 fallbacks, Q8_0), whose greedy tokens must equal the x86-64 build's. Debian/Ubuntu x86-64 hosts
# only (g++-aarch64-linux-gnu, qemu-user); elsewhere it says so and exits 0.
# Usage: bash tests/check_arm64.sh <x86-64 greedy_generate binary>
set -euo pipefail
cd "$(dirname "$0")/.."
native=$1
if [ "$(uname -m)" != x86_64 ] || ! command -v apt-get >/dev/null; then
  echo "arm64 check: not an x86-64 Debian host, skipped"; exit 0
fi
if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++-aarch64-linux-gnu qemu-user >/dev/null; then
      echo "arm64 check: could not install g++-aarch64-linux-gnu and qemu-user, skipped"; exit 0
    fi
  else
    echo "arm64 check: g++-aarch64-linux-gnu and qemu-user are missing, skipped"; exit 0
  fi
fi
out=build/arm64
mkdir -p "$out"
aarch64-linux-gnu-g++ -std=c++17 -O2 -march=armv8.2-a+fp16 -static -Iinclude src/core/*.cpp src/cpu/*.cpp \
  src/cpu/kernels/*.cpp src/models/*.cpp examples/greedy_generate/main.cpp -o "$out/greedy_generate" -lpthread
# The NEON register tiles of the GEMM against a double-precision reference, every remainder and dtype.
aarch64-linux-gnu-g++ -std=c++17 -O2 -march=armv8.2-a+fp16 -static -Iinclude -Isrc tests/cpp/check_gemm_tiles.cpp \
  src/cpu/machine_probes.cpp src/cpu/thread_pool.cpp -o "$out/check_gemm_tiles" -lpthread
tiles_ok=1
qemu-aarch64 "$out/check_gemm_tiles" || tiles_ok=0
ck=$(mktemp -d)
trap 'rm -rf "$ck"' EXIT
python3 - "$ck" <<'PY'
import os, shutil, sys
sys.path.insert(0, "tests/python")
from tiny_models import make_tiny_checkpoint
make_tiny_checkpoint(sys.argv[1] + "/llama", "llama", seed=3)
# the quantized kernels: the tiny model's matrices as Q4_K / Q5_0 and Q8_0 blocks (load-time quantization)
os.environ["METAL_ENGINE_CACHE"] = sys.argv[1] + "/cache"
from metal_engine.quantization import quantized_checkpoint
make_tiny_checkpoint(sys.argv[1] + "/llama256", "llama", seed=3, hidden_size=256, intermediate_size=512,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64)
for fmt in ("q4_k", "q8_0"):
    shutil.copytree(quantized_checkpoint(sys.argv[1] + "/llama256", fmt, progress=False), sys.argv[1] + "/" + fmt)
PY
fails=0
for dtype in float32 float16; do
  a=$(METAL_ENGINE_DTYPE=$dtype "$native" "$ck/llama" 10 3 1 4 1 5 9 2 6 | tail -1)
  b=$(METAL_ENGINE_DTYPE=$dtype qemu-aarch64 "$out/greedy_generate" "$ck/llama" 10 3 1 4 1 5 9 2 6 | tail -1)
  if [ "$a" = "$b" ]; then echo "arm64 $dtype: $b"; else echo "arm64 $dtype differs: x86-64 [$a] arm64 [$b]"; fails=$((fails+1)); fi
done
for q in q4_k q8_0; do  # quantized weights, f32 activations
  a=$(METAL_ENGINE_DTYPE=float32 "$native" "$ck/$q" 10 3 1 4 1 5 9 2 6 | tail -1)
  b=$(METAL_ENGINE_DTYPE=float32 qemu-aarch64 "$out/greedy_generate" "$ck/$q" 10 3 1 4 1 5 9 2 6 | tail -1)
  if [ "$a" = "$b" ]; then echo "arm64 $q: $b"; else echo "arm64 $q differs: x86-64 [$a] arm64 [$b]"; fails=$((fails+1)); fi
done
[ "$tiles_ok" = 1 ] || fails=$((fails+1))
echo "arm64 check: $((5 - fails)) passed, $fails failed (the example in f32, f16, Q4_K and Q8_0, the GEMM tiles)"
[ "$fails" = 0 ]
