"""End-to-end benchmarks on the default model (pytest-benchmark): one decode step at batch 1 and 16,
and a 512-token prefill, through the C++ engine. Run: pytest bench/ --benchmark-only."""

import numpy as np
import pytest

import metal_engine
from engine_harness import Harness, Seq
from metal_engine.gguf_checkpoint import default_checkpoint


@pytest.fixture(scope="module")
def engine():
    return metal_engine.Engine(default_checkpoint(progress=False), dtype="float16", num_threads=2)


@pytest.mark.parametrize("batch", [1, 16])
def test_decode_step(benchmark, engine, batch):
    h = Harness(engine)
    seqs = [Seq(tokens=list(range(100 + i, 116 + i))) for i in range(batch)]
    h.step([(s, 16) for s in seqs])

    def step():
        for s in seqs:
            s.tokens.append(7)
        h.step([(s, 1) for s in seqs])

    benchmark.pedantic(step, rounds=40, warmup_rounds=3)
    benchmark.extra_info["tok/s"] = batch / benchmark.stats["median"]
    for s in seqs:
        h.release(s)


def test_prefill_512(benchmark, engine):
    h = Harness(engine)
    rng = np.random.default_rng(0)

    def prefill():
        s = Seq(tokens=rng.integers(100, 40000, 512).tolist())
        h.step([(s, 512)])
        h.release(s)

    benchmark.pedantic(prefill, rounds=5, warmup_rounds=1)
    benchmark.extra_info["tok/s"] = 512 / benchmark.stats["median"]
