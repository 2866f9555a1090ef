"""Per-op benchmarks (pytest-benchmark) on every backend this build has: cpu, and metal-sim (the .metal
kernels on the CPU emulator) or metal. Shapes of the default model's decode (1 row, 4 and 16 rows batched)
and prefill (512 rows); metal-sim runs the decode shapes only (it emulates every GPU thread, so its times
track the kernels and the emulator, not a GPU). Run: pytest bench/ --benchmark-only."""

import numpy as np
import pytest

from metal_engine import _core
from op_testing import args, device, run, to_storage

H, I, V, HEADS, KV_HEADS, HD = 576, 1536, 49152, 9, 3, 64
BACKENDS = [b for b in ("cpu", "metal-sim", "metal") if b in _core.available_backends()]


@pytest.fixture(scope="module", params=BACKENDS)
def dev(request):
    return device(request.param, 2)


def emulated(dev, *too_big):
    """Skip shapes the emulator would take minutes over."""
    if dev.name == "metal-sim" and any(too_big):
        pytest.skip("decode shapes only on metal-sim")


@pytest.mark.parametrize("m", [1, 4, 16, 512])
@pytest.mark.parametrize("n,k", [(I, H), (H, I), (V, H)], ids=["up", "down", "lm_head"])
def test_matmul_f16(benchmark, dev, m, n, k):
    emulated(dev, m > 16, n == V)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = to_storage(rng.standard_normal((n, k)) * 0.05, "f16")
    y = np.empty((m, n), np.float32)
    a = args("MatmulArgs", m=m, n=n, k=k, has_bias=0)
    benchmark(run, dev, "matmul_f16", a, [x, w, None, y])
    benchmark.extra_info["GB/s (weights)"] = w.nbytes / benchmark.stats["median"] / 1e9
    benchmark.extra_info["GFLOP/s"] = 2 * m * n * k / benchmark.stats["median"] / 1e9


@pytest.mark.parametrize("q_len,ctx", [(1, 128), (1, 2048), (512, 512)], ids=["decode128", "decode2048", "prefill512"])
def test_paged_attention_f16(benchmark, dev, q_len, ctx):
    emulated(dev, q_len > 1)
    rng = np.random.default_rng(1)
    bs = 16
    nblocks = -(-ctx // bs)
    kc = to_storage(rng.standard_normal((nblocks, bs, KV_HEADS, HD)), "f16")
    vc = to_storage(rng.standard_normal((nblocks, bs, KV_HEADS, HD)), "f16")
    bt = rng.permutation(nblocks).astype(np.int32)[None, :]
    q = rng.standard_normal((q_len, HEADS * HD)).astype(np.float32)
    out = np.empty_like(q)
    a = args("PagedAttentionArgs", num_seqs=1, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HD, block_size=bs,
             block_table_width=nblocks, q_stride=HEADS * HD, sliding_window=0, scale=0.125)
    benchmark(run, dev, "paged_attention_f16", a,
              [q, kc, vc, bt, np.array([0, q_len], np.int32), np.array([ctx], np.int32), out])


@pytest.mark.parametrize("rows", [1, 512])
def test_rms_norm_f16(benchmark, dev, rows):
    emulated(dev, rows > 16)
    x = np.random.default_rng(2).standard_normal((rows, H)).astype(np.float32)
    res = x.copy()
    w = to_storage(np.ones(H), "f16")
    out = np.empty_like(x)
    benchmark(run, dev, "rms_norm_f16", args("RmsNormArgs", rows=rows, dim=H, eps=1e-5, add_residual=1),
              [x, res, w, out])


@pytest.mark.parametrize("rows", [1, 512])
def test_silu_mul(benchmark, dev, rows):
    emulated(dev, rows > 16)
    g = np.random.default_rng(3).standard_normal((rows, I)).astype(np.float32)
    out = np.empty_like(g)
    benchmark(run, dev, "silu_mul", args("SiluMulArgs", rows=rows, dim=I, in_stride=I), [g, g, out])
