"""The Python layer's share of a decode step with sampling on: batch 16 (and 1) of the default model at
temperature 0.8, top_p 0.9 (and greedy beside it), each step's time split into the C++ forward and the rest
(scheduling, the batch sampler, detokenisation, stop checks). Also the sampler alone on those logits.

    python bench/sampling_overhead.py [--markdown]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

PROMPT, NEW = 64, 48


def run(llm, batch: int, params) -> tuple[float, float]:
    """(ms per step, Python share) over NEW decode steps of `batch` sequences."""
    from compare import CoreTimer

    eng = llm.llm_engine
    rng = np.random.default_rng(batch)
    for i in range(batch):
        eng.add_request({"prompt_token_ids": rng.integers(100, 40000, PROMPT).tolist()}, params.clone(seed=i))
    eng.step()  # prefill
    timer = CoreTimer(eng)
    total, steps, share = timer.decode_until_done()
    timer.restore()
    return total / steps * 1000, share



def sampler_alone(llm, batch: int, params, reps: int = 20) -> float:
    """ms for one sample_batch call over `batch` rows of real logits."""
    from metal_engine.request import Request
    from metal_engine.sampler import sample_batch

    eng = llm.llm_engine
    ids = np.random.default_rng(0).integers(100, 40000, (batch, PROMPT)).astype(np.int32)
    reqs = [Request(str(i), ids[i].tolist(), params.clone(seed=i), arrival_time=0.0, max_model_len=2048)
            for i in range(batch)]
    logits = np.random.default_rng(1).standard_normal((batch, eng.vocab_size)).astype(np.float32) * 4
    times = []
    for _ in range(reps):
        s = time.perf_counter()
        sample_batch(logits, reqs, eng.rng)
        times.append(time.perf_counter() - s)
    return statistics.median(times) * 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    from metal_engine import LLM, SamplingParams

    llm = LLM(dtype="float16", max_num_seqs=16, enable_prefix_caching=False, progress=False)
    sampled = SamplingParams(max_tokens=NEW + 1, temperature=0.8, top_p=0.9, ignore_eos=True)
    greedy = SamplingParams(max_tokens=NEW + 1, temperature=0.0, ignore_eos=True)
    rows = []
    for batch in (1, 16):
        for name, params in (("greedy", greedy), ("temperature 0.8, top_p 0.9", sampled)):
            ms, share = run(llm, batch, params)
            rows.append((batch, name, ms, share))
    alone = sampler_alone(llm, 16, sampled)
    if args.markdown:
        print("| batch | sampling | ms per decode step | Python layer's share |")
        print("|---|---|---|---|")
        for b, name, ms, share in rows:
            print(f"| {b} | {name} | {ms:.1f} | {share:.1%} |")
        print(f"\nThe batch sampler alone (16 rows of {llm.llm_engine.vocab_size} logits, temperature 0.8, top_p "
              f"0.9, flat random logits: its worst case): {alone:.2f} ms.")
    else:
        for b, name, ms, share in rows:
            print(f"batch {b:2d} {name:28s} {ms:7.1f} ms/step  Python share {share:.1%}")
        print(f"sampler alone, 16 rows: {alone:.2f} ms")


if __name__ == "__main__":
    main()
