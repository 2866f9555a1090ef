"""The Python layer's share of a decode step with sampling on: batch 16 (and 1) of the default model at
temperature 0.8, top_p 0.9 (and greedy beside it), each step's time split into the C++ forward and the rest
(scheduling, the batch sampler, detokenisation, stop checks). Also the sampler alone on those logits, and the
host's work per step against the context: batch-16 greedy decode after 64- and 2000-token prompts (the Python
layer's milliseconds per step should not grow with the context: block tables are appended to, prefix-cache
hashing is incremental, no hashing with caching off).

    python bench/sampling_overhead.py [--markdown] [--no-context]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

PROMPT, NEW = 64, 48


def run(llm, batch: int, params, prompt: int = PROMPT) -> tuple[float, float]:
    """(ms per step, Python share) over NEW decode steps of `batch` sequences."""
    from compare import CoreTimer

    eng = llm.llm_engine
    rng = np.random.default_rng(batch)
    for i in range(batch):
        eng.add_request({"prompt_token_ids": rng.integers(100, 40000, prompt).tolist()}, params.clone(seed=i))
    while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in eng.scheduler.running + list(eng.scheduler.waiting)):
        eng.step()  # prefill (in chunks when long)
    timer = CoreTimer(eng)
    total, steps, share = timer.decode_until_done()
    timer.restore()
    return total / steps * 1000, share


def context_rows(contexts=(64, 2000), batch: int = 16) -> list:
    """(context, ms per step, Python ms per step, share) of batch-16 greedy decode after prompts of each length,
    prefix caching on (the default)."""
    from metal_engine import LLM, SamplingParams

    llm = LLM(dtype="float16", max_num_seqs=batch, max_model_len=max(contexts) + NEW + 8,
              kv_cache_memory=3 << 29, max_num_batched_tokens=2048, progress=False)
    greedy = SamplingParams(max_tokens=NEW + 1, temperature=0.0, ignore_eos=True)
    out = []
    for c in contexts:
        ms, share = run(llm, batch, greedy, prompt=c)
        out.append((c, ms, ms * share, share))
    return out



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
    ap.add_argument("--no-context", action="store_true", help="skip the context-length rows (they prefill 32k tokens)")
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
    ctx = [] if args.no_context else context_rows()
    if args.markdown:
        print("| batch | sampling | ms per decode step | Python layer's share |")
        print("|---|---|---|---|")
        for b, name, ms, share in rows:
            print(f"| {b} | {name} | {ms:.1f} | {share:.1%} |")
        print(f"\nThe batch sampler alone (16 rows of {llm.llm_engine.vocab_size} logits, temperature 0.8, top_p "
              f"0.9, flat random logits: its worst case): {alone:.2f} ms.")
        if ctx:
            print("\nThe host's work against the context (batch 16, greedy, prefix caching on):\n")
            print("| context | ms per decode step | Python ms per step | Python share |")
            print("|---|---|---|---|")
            for c, ms, py, share in ctx:
                print(f"| {c} | {ms:.1f} | {py:.2f} | {share:.1%} |")
    else:
        for b, name, ms, share in rows:
            print(f"batch {b:2d} {name:28s} {ms:7.1f} ms/step  Python share {share:.1%}")
        print(f"sampler alone, 16 rows: {alone:.2f} ms")
        for c, ms, py, share in ctx:
            print(f"context {c:5d}: {ms:7.1f} ms/step, Python {py:.2f} ms ({share:.1%})")


if __name__ == "__main__":
    main()
