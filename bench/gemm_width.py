"""The cpu GEMM's two choices on an AVX-512 machine, A/B in one run: the 256-bit dot-product tiles for every row
count (METAL_ENGINE_CPU_GEMM_BITS=256) against the 512-bit packed panels from 256 rows (=512; what start-up picks
where 512-bit FMAs run 1.4x the 256-bit rate), each in its own process, interleaved. Per choice: the one-core FMA
rate, the matmul's GFLOP/s at the default model's prefill shapes (f16 weights, 2 threads), and the default model
end to end (fp16 and its Q4_1 file: a 512-token prefill, batch-16 decode, which stays on the tiles).

    python bench/gemm_width.py [--repeats 3] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WORKER = r"""
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from op_testing import _core, args, device, run, to_storage
from metal_engine import LLM, SamplingParams

out = {"gemm": _core.cpu_gemm(), "fma_1core": _core.cpu_fma_peak_gflops(num_threads=1, repeats=3)}  # widest used
dev = device("cpu", 2)
rng = np.random.default_rng(0)
H, I = 576, 1536
for m in (64, 512, 2048):
    for name, n, k in (("qkv", 960, H), ("gate_up", 2 * I, H), ("down", H, I)):
        x = rng.standard_normal((m, k)).astype(np.float32)
        w = to_storage(rng.standard_normal((n, k)) * 0.05, "f16")
        y = np.empty((m, n), np.float32)
        a = args("MatmulArgs", m=m, n=n, k=k, has_bias=0)
        ts = []
        for _ in range(15 if m < 2048 else 5):
            t0 = time.perf_counter()
            run(dev, "matmul_f16", a, [x, w, None, y])
            ts.append(time.perf_counter() - t0)
        out[f"matmul m={m} {name}"] = 2 * m * n * k / float(np.median(ts)) / 1e9

def timed(llm, prompts, new):
    sp = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return time.perf_counter() - t0

for dtype in ("float16", "auto"):  # auto: the Q4_1 file's own blocks
    llm = LLM(dtype=dtype, max_num_batched_tokens=512, enable_prefix_caching=False, num_threads=2, progress=False)
    label = "fp16" if dtype == "float16" else "Q4_1"
    p512 = [rng.integers(100, 40000, 512).tolist()]
    out[f"{label} prefill 512 tok/s"] = 512 / timed(llm, p512, 1)
    b16 = [rng.integers(100, 40000, 16).tolist() for _ in range(16)]
    t_pre = timed(llm, b16, 1)
    out[f"{label} decode b16 tok/s"] = 16 * 32 / (timed(llm, b16, 33) - t_pre)
    del llm
print("RESULT " + json.dumps(out))
"""


def one(bits: str) -> dict:
    env = dict(os.environ, METAL_ENGINE_CPU_GEMM_BITS=bits)
    here = os.path.dirname(os.path.abspath(__file__))
    p = subprocess.run([sys.executable, "-c", WORKER, os.path.join(here, "..", "tests", "python")], env=env,
                       capture_output=True, text=True, timeout=1800)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"width {bits} failed:\n{p.stderr[-3000:]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    from metal_engine import _core

    if 512 not in _core.cpu_gemm_bits():
        sys.exit(f"this build's GEMM has no 512-bit panels ({_core.cpu_gemm()}): nothing to compare")
    runs = {"256": [], "512": []}
    load = []
    for _ in range(a.repeats):  # interleaved: 256 512 256 512 ...
        for bits in runs:
            runs[bits].append(one(bits))
            load.append(os.getloadavg()[0])
    keys = [k for k in runs["256"][0] if k != "gemm"]
    med = {b: {k: statistics.median(r[k] for r in rs) for k in keys} for b, rs in runs.items()}
    print(f"{a.repeats} interleaved repetition(s), median of each; load average {min(load):.1f}-{max(load):.1f}; "
          f"picked at start-up here: {_core.cpu_gemm()}\n")
    sep = "|" if a.markdown else " "
    if a.markdown:
        print("| figure | tiles (256-bit) | panels from 256 rows (512-bit) | ratio |\n|---|---|---|---|")
    for k in keys:
        x, y = med["256"][k], med["512"][k]
        unit = "" if "tok/s" in k else " GFLOP/s"
        name = k.replace("fma_1core", "FMA peak of the widest vectors used, one core")
        print(f"{sep} {name}{unit} {sep} {x:.1f} {sep} {y:.1f} {sep} {y / x:.2f}x {sep}" if a.markdown
              else f"{name:32s} {x:8.1f} {y:8.1f}  {y / x:.2f}x")


if __name__ == "__main__":
    main()
