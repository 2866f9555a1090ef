"""End-to-end benchmarks (pytest-benchmark): one decode step at batch 1 and 16, and a prefill, through the C++
engine, on every backend this build has. cpu (and metal on a Mac) run the default model with a 512-token
prefill; metal-sim emulates every GPU thread, so it runs a tiny random Llama (2 layers, hidden 64) and a
64-token prefill: its times track the kernels and the emulator, not a GPU. Run: pytest bench/ --benchmark-only."""

import numpy as np
import pytest

import metal_engine
from engine_harness import Harness, Seq
from metal_engine import _core
from metal_engine.gguf_checkpoint import default_checkpoint

BACKENDS = [b for b in ("cpu", "metal-sim", "metal") if b in _core.available_backends()]


@pytest.fixture(scope="module", params=BACKENDS)
def engine(request, tmp_path_factory):
    if request.param == "metal-sim":
        from tiny_models import make_tiny_checkpoint

        path = tmp_path_factory.mktemp("tiny") / "llama"
        make_tiny_checkpoint(path, "llama", seed=1)
        return metal_engine.Engine(path, dtype="float16", backend="metal-sim", num_threads=2)
    return metal_engine.Engine(default_checkpoint(progress=False, dequantize=True), dtype="float16", backend=request.param,
                               num_threads=2)


def prefill_len(engine):
    return 64 if engine.backend == "metal-sim" else 512


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


def test_prefill(benchmark, engine):
    h = Harness(engine)
    rng = np.random.default_rng(0)
    n = prefill_len(engine)

    def prefill():
        s = Seq(tokens=rng.integers(100, 200, n).tolist())
        h.step([(s, n)])
        h.release(s)

    benchmark.pedantic(prefill, rounds=5, warmup_rounds=1)
    benchmark.extra_info["tokens"] = n
    benchmark.extra_info["tok/s"] = n / benchmark.stats["median"]
