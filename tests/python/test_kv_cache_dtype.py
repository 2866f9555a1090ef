"""kv_cache_dtype (vLLM's knob): the KV cache's float type apart from the weights'."""

import numpy as np
import pytest

import metal_engine
from engine_harness import Harness
from tiny_models import make_tiny_checkpoint

IDS = [[5, 17, 33, 2, 9, 100, 41, 7], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("kv") / "llama", "llama", seed=11)


def run(ckpt, **kw):
    e = metal_engine.Engine(ckpt, kv_cache_memory=4 << 20, **kw)
    return e, Harness(e).prefill_and_decode(IDS, 6)


def test_kv_cache_dtype_is_its_own_knob(ckpt):
    e32, ref = run(ckpt, dtype="float32")
    assert e32.kv_cache_dtype == "f32"
    e, _ = run(ckpt, dtype="float32", kv_cache_dtype="bfloat16")
    assert (e.dtype, e.kv_cache_dtype) == ("f32", "bf16")
    e16, _ = run(ckpt, dtype="float16")
    assert e16.kv_cache_dtype == "f16"  # auto: the weights' dtype
    ef, _ = run(ckpt, dtype="float16", kv_cache_dtype="fp32")
    assert ef.kv_cache_dtype == "f32"


def test_a_bf16_kv_cache_moves_logits_by_its_rounding_only(ckpt):
    _, ref = run(ckpt, dtype="float32")
    forced = [t[len(p):] for (_, t), p in zip(ref, IDS)]
    e = metal_engine.Engine(ckpt, dtype="float32", kv_cache_dtype="bfloat16", kv_cache_memory=4 << 20)
    got = Harness(e).prefill_and_decode(IDS, 6, forced=forced)
    for (a, _), (b, _) in zip(got, ref):
        diff = np.abs(a - b).max()
        assert 0 < diff < 0.05 * np.abs(b).max()  # changed (bf16 keys and values), but only by their rounding


def test_bad_kv_cache_dtype_is_refused_clearly(ckpt):
    with pytest.raises(ValueError, match="kv_cache_dtype 'fp8'.*auto, float32, float16 or bfloat16"):
        metal_engine.Engine(ckpt, kv_cache_dtype="fp8", kv_cache_memory=4 << 20)
    with pytest.raises(ValueError, match="kv_cache_dtype 'half8': use auto"):
        metal_engine.Engine(ckpt, kv_cache_dtype="half8", kv_cache_memory=4 << 20)
    if "metal-sim" in metal_engine._core.available_backends():
        with pytest.raises(ValueError, match="keep the KV cache in the activations' 16-bit dtype"):
            metal_engine.Engine(ckpt, backend="metal-sim", dtype="float16", kv_cache_dtype="float32",
                                kv_cache_memory=4 << 20)


def test_llm_takes_kv_cache_dtype(ckpt):
    llm = metal_engine.LLM(str(ckpt), dtype="float32", kv_cache_dtype="float16", progress=False)
    assert llm.llm_engine.engine.kv_cache_dtype == "f16"
