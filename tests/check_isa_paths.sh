#!/usr/bin/env bash
# The cpu kernels have a vector path per instruction set: AVX-512VL tiles, AVX2 + FMA + F16C, and plain C++.
# A native build tests only this machine's; this builds the extension again for x86-64-v3 (AVX2, no AVX-512)
# and for baseline x86-64 (no AVX: the plain C++ kernels) and runs the op tests against each.
# Usage: bash tests/check_isa_paths.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "$(uname -m)" != x86_64 ]; then
  echo "ISA paths check: not an x86-64 host, skipped"; exit 0
fi
for march in x86-64-v3 x86-64; do
  dir=build/isa-$march
  rm -rf "$dir"
  "$PY" -m pip install -q --no-deps --target "$dir" . -Cbuild-dir="build/isa-$march-build" \
    -Ccmake.define.METAL_ENGINE_MARCH=$march -Ccmake.define.METAL_ENGINE_METAL_BACKEND=OFF \
    -Ccmake.define.METAL_ENGINE_METAL_SIM=OFF
  echo "op tests, kernels built for -march=$march:"
  core=$(ls "$dir"/metal_engine/_core.*)
  METAL_ENGINE_TEST_CORE="$PWD/$core" "$PY" -m pytest -q -p no:cacheprovider tests/python/ops "$@"
done
