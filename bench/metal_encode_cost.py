"""The host's cost of encoding a Metal step (#13 item 1): per decode step and per model layer, the time from
begin_step to commit (the model's forward walked, every dispatch encoded) and its metal-cpp calls, beside the
dispatches and memory barriers. Runs on the Metal backend the build has (metal-sim here: its kernels run at
commit, after the encode time is taken, so what it runs does not count).

    python bench/metal_encode_cost.py [--markdown] [--steps N]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def measure(path, backend: str, batch: int, steps: int):
    from metal_engine.engine import Engine

    engine = Engine(path, backend=backend, dtype="float16", kv_cache_memory=64 << 20)
    layers = engine.model_config.num_layers
    bs = engine.block_size
    rng = np.random.default_rng(0)
    prompt = 8
    seqs = [rng.integers(1, engine.model_config.vocab_size, prompt).tolist() for _ in range(batch)]
    tables = np.array([[s * 8 + b for b in range(8)] for s in range(batch)], np.int32)

    def step(positions):
        toks = [s[p] if p < len(s) else 1 for s, p in zip(seqs, positions)]
        slots = [int(tables[i, p // bs]) * bs + p % bs for i, p in enumerate(positions)]
        return engine.step(token_ids=np.array(toks, np.int32), positions=np.array(positions, np.int32),
                           query_start_loc=np.arange(batch + 1, dtype=np.int32),
                           seq_lens=np.array([p + 1 for p in positions], np.int32), block_tables=tables,
                           slot_mapping=np.array(slots, np.int64), logits_indices=np.arange(batch, dtype=np.int32),
                           greedy=True)

    for p in range(prompt - 1):  # the prompts, a token a step, outside the measurement
        step([p] * batch)
    core = engine._engine
    core.set_profiling(True)
    core.take_profile()
    for k in range(steps):
        step([prompt - 1 + k] * batch)
    prof = core.take_profile()
    core.set_profiling(False)
    calls, seconds = prof["(encode)"]
    dispatches = sum(c for name, (c, _) in prof.items() if not name.startswith("("))
    barriers = prof.get("(memory barriers)", (0, 0))[0]
    return dict(layers=layers, us_step=seconds / steps * 1e6, us_layer=seconds / steps / layers * 1e6,
                calls=calls / steps, dispatches=dispatches / steps, barriers=barriers / steps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    from metal_engine import _core
    from metal_engine.gguf_checkpoint import default_checkpoint

    backend = next((b for b in ("metal", "metal-sim") if b in _core.available_backends()), None)
    if backend is None:
        raise SystemExit("this build has no Metal backend (metal or metal-sim)")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "python"))
    from tiny_models import make_tiny_checkpoint

    tiny = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "llama", "llama", seed=1)
    rows = []
    for name, path in (("tiny Llama (2 layers)", tiny), ("SmolLM2-135M, Q4_1 file (30 layers)", default_checkpoint())):
        for batch in (1, 16):
            rows.append((name, batch, measure(path, backend, batch, args.steps)))
    if args.markdown:
        print(f"| model ({backend}) | batch | encode us / step | us / layer | metal-cpp calls / step | dispatches | "
              "barriers |\n|---|---|---|---|---|---|---|")
        for name, batch, r in rows:
            print(f"| {name} | {batch} | {r['us_step']:.0f} | {r['us_layer']:.1f} | {r['calls']:.0f} | "
                  f"{r['dispatches']:.0f} | {r['barriers']:.0f} |")
    else:
        for name, batch, r in rows:
            print(f"{name}, batch {batch}: encode {r['us_step']:.0f} us/step ({r['us_layer']:.1f} us/layer), "
                  f"{r['calls']:.0f} metal-cpp calls, {r['dispatches']:.0f} dispatches, {r['barriers']:.0f} barriers")


if __name__ == "__main__":
    main()
