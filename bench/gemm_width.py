"""A/B of the cpu GEMM's run-time choices in one run, each choice in its own process, interleaved:

- `--choice bits` (default; an AVX-512 machine): the 256-bit dot-product tiles for every row count
  (METAL_ENGINE_CPU_GEMM_BITS=256) against the 512-bit packed panels from 256 rows (=512; what start-up picks where
  512-bit FMAs run 1.4x the 256-bit rate); matmuls of f16 weights.
- `--choice quant-panels` (an AVX-512 VNNI build): the quantized matmuls of 6+ rows dequantizing W for the float
  GEMM (METAL_ENGINE_CPU_QUANT_PANELS=0) against the int16 panels (=1, the default where AMX does not run);
  matmuls of Q4_1 and Q8_0 weights.

Per choice: the one-core FMA rate, the matmul's GFLOP/s at the default model's shapes (2 threads; through the op
harness, whose buffer copies count), and the default model end to end (fp16 and its Q4_1 file: a 512-token
prefill, batch-16 decode).

    python bench/gemm_width.py [--choice bits|quant-panels] [--repeats 3] [--markdown]
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
from op_testing import _core, args, device, random_quant_rows, run, to_storage
from metal_engine import LLM, SamplingParams

out = {"gemm": _core.cpu_gemm(), "fma_1core": _core.cpu_fma_peak_gflops(num_threads=1, repeats=3)}  # widest used
dev = device("cpu", 2)
rng = np.random.default_rng(0)
H, I = 576, 1536
fmts, rows = sys.argv[2].split(","), [int(m) for m in sys.argv[3].split(",")]
for fmt in fmts:
    for m in rows:
        for name, n, k in (("qkv", 960, H), ("gate_up", 2 * I, H), ("down", H, I)):
            x = rng.standard_normal((m, k)).astype(np.float32)
            w = (to_storage(rng.standard_normal((n, k)) * 0.05, "f16") if fmt == "f16"
                 else random_quant_rows(fmt, n, k, rng))
            y = np.empty((m, n), np.float32)
            a = args("MatmulArgs", m=m, n=n, k=k, has_bias=0)
            ts = []
            for _ in range(15 if m < 2048 else 5):
                t0 = time.perf_counter()
                run(dev, f"matmul_{fmt}", a, [x, w, None, y])
                ts.append(time.perf_counter() - t0)
            out[f"matmul {fmt} m={m} {name}"] = 2 * m * n * k / float(np.median(ts)) / 1e9

def timed(llm, prompts, new):
    sp = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return time.perf_counter() - t0

from metal_engine.gguf_checkpoint import default_checkpoint

for label in ("fp16", "Q4_1"):  # fp16: the Q4_1 file dequantized (as bench/compare.py); Q4_1: its own blocks
    model = str(default_checkpoint(progress=False, dequantize=True)) if label == "fp16" else None
    llm = LLM(model=model, dtype="float16", max_num_batched_tokens=512, enable_prefix_caching=False, num_threads=2,
              progress=False)
    p512 = [rng.integers(100, 40000, 512).tolist()]
    out[f"{label} prefill 512 tok/s"] = 512 / timed(llm, p512, 1)
    b16 = [rng.integers(100, 40000, 16).tolist() for _ in range(16)]
    t_pre = timed(llm, b16, 1)
    out[f"{label} decode b16 tok/s"] = 16 * 32 / (timed(llm, b16, 33) - t_pre)
    del llm
print("RESULT " + json.dumps(out))
"""


# per choice: the env var, its two values and their names, the matmul formats and row counts
CHOICES = {
    "bits": ("METAL_ENGINE_CPU_GEMM_BITS", {"256": "tiles (256-bit)", "512": "panels from 256 rows (512-bit)"},
             "f16", "64,512,2048"),
    "quant-panels": ("METAL_ENGINE_CPU_QUANT_PANELS", {"0": "W dequantized, float GEMM", "1": "int16 panels"},
                     "q4_1,q8_0", "16,64,512"),
}


def one(choice: str, value: str) -> dict:
    var, _, fmts, rows = CHOICES[choice]
    env = dict(os.environ, **{var: value})
    here = os.path.dirname(os.path.abspath(__file__))
    p = subprocess.run([sys.executable, "-c", WORKER, os.path.join(here, "..", "tests", "python"), fmts, rows],
                       env=env, capture_output=True, text=True, timeout=1800)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{var}={value} failed:\n{p.stderr[-3000:]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--choice", choices=sorted(CHOICES), default="bits")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    from metal_engine import _core

    if a.choice == "bits" and 512 not in _core.cpu_gemm_bits():
        sys.exit(f"this build's GEMM has no 512-bit panels ({_core.cpu_gemm()}): nothing to compare")
    if a.choice == "quant-panels" and True not in _core.cpu_quant_panels_choices():
        sys.exit(f"this build has no int16 panels for quantized weights ({_core.cpu_gemm()}): nothing to compare")
    if a.choice == "quant-panels" and _core.cpu_amx():
        sys.exit("this machine runs the quantized matmuls on AMX tiles: the int16 panels do not run here")
    var, names, _, _ = CHOICES[a.choice]
    values = list(names)
    runs = {v: [] for v in values}
    load = []
    for _ in range(a.repeats):  # interleaved: A B A B ...
        for v in values:
            runs[v].append(one(a.choice, v))
            load.append(os.getloadavg()[0])
    keys = [k for k in runs[values[0]][0] if k != "gemm"]
    med = {v: {k: statistics.median(r[k] for r in rs) for k in keys} for v, rs in runs.items()}
    print(f"{a.repeats} interleaved repetition(s), median of each; load average {min(load):.1f}-{max(load):.1f}; "
          f"picked at start-up here: {_core.cpu_gemm()}\n")
    sep = "|" if a.markdown else " "
    if a.markdown:
        print(f"| figure | {names[values[0]]} ({var}={values[0]}) | {names[values[1]]} ({var}={values[1]}) | ratio |\n"
              "|---|---|---|---|")
    for k in keys:
        x, y = med[values[0]][k], med[values[1]][k]
        unit = "" if "tok/s" in k else " GFLOP/s"
        name = k.replace("fma_1core", "FMA peak of the widest vectors used, one core")
        print(f"{sep} {name}{unit} {sep} {x:.1f} {sep} {y:.1f} {sep} {y / x:.2f}x {sep}" if a.markdown
              else f"{name:32s} {x:8.1f} {y:8.1f}  {y / x:.2f}x")


if __name__ == "__main__":
    main()
