"""Where a step's time goes: per-kernel time of the cpu backend for decode at batch 1 and 16 and a
512-token prefill of the default model, beside the whole step as the Python layer sees it.

    python bench/profile_step.py [--markdown]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def profile(llm, batch: int, prompt_len: int, new_tokens: int):
    from metal_engine import SamplingParams

    eng = llm.llm_engine
    core = eng.engine._engine
    rng = np.random.default_rng(batch)
    for _ in range(batch):
        eng.add_request({"prompt_token_ids": rng.integers(100, 40000, prompt_len).tolist()},
                        SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
    if new_tokens > 1:
        eng.step()  # prefill outside the measurement
    core.set_profiling(True)
    core.take_profile()
    t0 = time.perf_counter()
    steps = 0
    while eng.has_unfinished_requests():
        eng.step()
        steps += 1
    total = time.perf_counter() - t0
    prof = core.take_profile()
    core.set_profiling(False)
    return total, steps, prof


def report(name, total, steps, prof, markdown):
    kernels = sum(s for _, s in prof.values())
    rows = sorted(prof.items(), key=lambda kv: -kv[1][1])
    if markdown:
        print(f"\n**{name}**: {total / steps * 1000:.2f} ms per step\n")
        print("| part | ms per step | share |\n|---|---|---|")
        for k, (calls, sec) in rows:
            print(f"| `{k}` ({calls // steps} per step) | {sec / steps * 1000:.2f} | {sec / total:.0%} |")
        print(f"| everything else (Python layer, step setup, sampling) | {(total - kernels) / steps * 1000:.2f} | "
              f"{(total - kernels) / total:.0%} |")
    else:
        print(f"{name}: {total / steps * 1000:.2f} ms/step")
        for k, (calls, sec) in rows:
            print(f"  {k:28s} {sec / steps * 1000:7.2f} ms  {sec / total:5.1%}  ({calls // steps}/step)")
        print(f"  {'(other)':28s} {(total - kernels) / steps * 1000:7.2f} ms  {(total - kernels) / total:5.1%}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    from metal_engine import LLM

    llm = LLM(dtype="float16", max_num_batched_tokens=512, enable_prefix_caching=False, num_threads=2, progress=False)
    for name, batch, plen, new in [("decode, batch 1", 1, 16, 65), ("decode, batch 16", 16, 16, 33),
                                   ("prefill, 512 tokens", 1, 512, 1)]:
        report(name, *profile(llm, batch, plen, new), args.markdown)


if __name__ == "__main__":
    main()
