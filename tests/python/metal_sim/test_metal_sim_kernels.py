"""The Metal backend's own attention paths (the KV write fused into decode attention, split-and-reduce, the tiled
prefill kernel) against the cpu backend's paged_attention, the kernels' limits, the emulator's registry and
function constants. Every op the cpu backend has is run on every backend by tests/python/ops/test_backend_ops.py
(its cases in tests/python/ops/cases.py). On metal-sim's CPU emulator with threads first-to-last and
last-to-first, and through the Metal backend; on a Mac without the emulator, on the real Metal device."""

import numpy as np
import pytest

from metal_engine import _core
from cases import ATTENTION_CASES  # (q_lens, seq_lens, heads, kv_heads, head_dim, block_size, window)
from op_testing import DTYPES, Guarded, args, device, run, to_storage

# forward / reverse: metal-sim's emulator directly, threads first-to-last and last-to-first;
# backend: through the Metal backend (metal-cpp, buffers copied in and out, one command buffer)
_BACKEND = next((b for b in ("metal", "metal-sim") if b in _core.available_backends()), None)
ORDERS = pytest.mark.parametrize("reverse", [False, True] + (["backend"] if _BACKEND else []),
                                 ids=["forward", "reverse"] + (["backend"] if _BACKEND else []))


EMULATOR = hasattr(_core, "metal_sim")


def sim(kernel, a, buffers, reverse):
    if reverse == "backend":
        run(device(_BACKEND), kernel, a, buffers)
    elif EMULATOR:
        _core.metal_sim.run(kernel, a, buffers, reverse)
    else:  # a Mac: the kernel on the GPU (the thread order is the GPU's own)
        run(device("metal"), kernel, a, buffers)


def cpu(kernel, a, buffers):
    run(device("cpu", 2), kernel, a, buffers)


def attention_case(dtype, q_lens, seq_lens, heads, kv_heads, hd, bs, window, seed, softcap=0.0):
    """Inputs of one attention step over shuffled, non-contiguous blocks, and the cpu op's output.
    Returns (args, [q, k_cache, v_cache, block_tables, query_start_loc, seq_lens], reference)."""
    rng = np.random.default_rng(seed)
    S, T = len(q_lens), sum(q_lens)
    nblocks = [-(-n // bs) for n in seq_lens]
    num_blocks = sum(nblocks) + 3
    perm = rng.permutation(num_blocks).astype(np.int32)
    width = max(nblocks) + 1
    bt = np.full((S, width), -1, np.int32)
    i = 0
    for s_, n in enumerate(nblocks):
        bt[s_, :n] = perm[i : i + n]
        i += n
    kc = to_storage(rng.standard_normal((num_blocks, bs, kv_heads, hd)), dtype)
    vc = to_storage(rng.standard_normal((num_blocks, bs, kv_heads, hd)), dtype)
    q = rng.standard_normal((T, heads * hd)).astype(np.float32)
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    lens = np.array(seq_lens, np.int32)
    a = args("PagedAttentionArgs", num_seqs=S, num_heads=heads, num_kv_heads=kv_heads, head_dim=hd, block_size=bs,
             block_table_width=width, q_stride=heads * hd, sliding_window=window, scale=1.0 / np.sqrt(hd),
             num_tokens=T, softcap=softcap)
    inputs = [q, kc, vc, bt, qsl, lens]
    ref = np.zeros((T, heads * hd), np.float32)
    cpu(f"paged_attention_{dtype}", a, inputs + [ref])
    return a, inputs, ref




DECODE_CASES = [  # (seq_lens, heads, kv_heads, head_dim, block_size, window): one new token per sequence
    ([1], 1, 1, 8, 1, 0),
    ([9, 33, 2], 4, 2, 16, 4, 0),
    ([40, 17], 9, 3, 64, 16, 5),      # sliding window
    ([70], 2, 1, 128, 8, 0),
    ([6, 6, 11], 3, 3, 24, 5, 0),     # MHA, odd sizes
    ([30, 5], 4, 1, 256, 16, 0),      # wide heads (Gemma 3 1B's shape)
]


@ORDERS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_lens,heads,kv_heads,hd,bs,window", DECODE_CASES)
def test_paged_attention_decode_fuses_the_kv_write(dtype, seq_lens, heads, kv_heads, hd, bs, window, reverse):
    """paged_attention_decode == kv_write of the new tokens, then paged_attention (the cpu ops)."""
    T = len(seq_lens)
    attn, (q, kc, vc, bt, qsl, lens), _ = attention_case(dtype, [1] * T, seq_lens, heads, kv_heads, hd, bs, window,
                                                        sum(seq_lens) + 7 * hd)
    rng = np.random.default_rng(hd + T)
    stride = kv_heads * hd + 3  # k and v rows wider than the heads, as when they are views of a wider buffer
    k = rng.standard_normal((T, stride)).astype(np.float32)
    v = rng.standard_normal((T, stride)).astype(np.float32)
    slots = np.array([bt[s_, (n - 1) // bs] * bs + (n - 1) % bs for s_, n in enumerate(seq_lens)], np.int64)
    if T > 2:
        slots[1] = -1  # not written: the row attends over what the cache holds
    num_slots = kc.shape[0] * bs
    write = args("KVWriteArgs", num_tokens=T, num_kv_heads=kv_heads, head_dim=hd, block_size=bs, num_slots=num_slots,
                 k_stride=stride, v_stride=stride)
    ref_k, ref_v = kc.copy(), vc.copy()
    cpu(f"kv_write_{dtype}", write, [k, v, slots, ref_k, ref_v])
    ref = np.zeros((T, heads * hd), np.float32)
    cpu(f"paged_attention_{dtype}", attn, [q, ref_k, ref_v, bt, qsl, lens, ref])
    dec = _core.ops.PagedAttentionDecodeArgs()
    dec.attn, dec.k_stride, dec.v_stride, dec.num_slots = attn, stride, stride, num_slots
    out = Guarded((T, heads * hd))
    gk, gv = Guarded(kc.shape, dtype=kc.dtype, fill=kc), Guarded(vc.shape, dtype=vc.dtype, fill=vc)
    sim(f"paged_attention_decode_{dtype}", dec, [q, k, v, slots, gk.array, gv.array, bt, qsl, lens, out.array], reverse)
    np.testing.assert_array_equal(gk.array, ref_k)
    np.testing.assert_array_equal(gv.array, ref_v)
    np.testing.assert_allclose(out.array, ref, rtol=1e-4, atol=2e-5)
    for g_ in (out, gk, gv):
        g_.check_guards()


SPLIT_CASES = [  # (q_lens, seq_lens, heads, kv_heads, head_dim, block_size, window, partition_size)
    ([1, 1], [300, 77], 4, 2, 64, 16, 0, 64),      # decode rows over several partitions
    ([1, 1, 1], [513, 1, 129], 9, 3, 64, 16, 0, 128),
    ([1], [700], 2, 1, 128, 8, 100, 32),           # a window: most partitions see no key
    ([5, 1], [37, 90], 4, 4, 24, 5, 0, 16),        # prefill rows through the split path too
    ([1, 1], [300, 40], 4, 2, 256, 16, 0, 64),     # wide heads
]


@ORDERS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_lens,seq_lens,heads,kv_heads,hd,bs,window,psize", SPLIT_CASES)
def test_paged_attention_split_and_reduce(dtype, q_lens, seq_lens, heads, kv_heads, hd, bs, window, psize, reverse):
    attn, inputs, ref = attention_case(dtype, q_lens, seq_lens, heads, kv_heads, hd, bs, window,
                                       sum(seq_lens) + psize)
    T = sum(q_lens)
    P = -(-max(seq_lens) // psize)
    split = _core.ops.PagedAttentionSplitArgs()
    split.attn, split.partition_size, split.max_partitions = attn, psize, P
    pmax, psum = Guarded((T, heads, P)), Guarded((T, heads, P))
    pout = Guarded((T, heads, P, hd))
    sim(f"paged_attention_split_{dtype}", split, inputs + [pmax.array, psum.array, pout.array], reverse)
    red = _core.ops.PagedAttentionReduceArgs()
    red.num_tokens, red.num_heads, red.head_dim, red.max_partitions = T, heads, hd, P
    out = Guarded((T, heads * hd))
    sim("paged_attention_reduce", red, [pmax.array, psum.array, pout.array, out.array], reverse)
    np.testing.assert_allclose(out.array, ref, rtol=1e-4, atol=2e-5)
    for g_ in (pmax, psum, pout, out):
        g_.check_guards()


# the tiled kernel: head_dim a multiple of 8, at most 128 (wider heads take paged_attention_*)
PREFILL_CASES = [c for c in ATTENTION_CASES if c[4] % 8 == 0 and c[4] <= 128] + [
    ([40], [40], 4, 2, 16, 16, 0),
    ([17, 33], [17, 60], 6, 2, 128, 16, 9),
]


@ORDERS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_lens,seq_lens,heads,kv_heads,hd,bs,window", PREFILL_CASES)
def test_paged_attention_prefill(dtype, q_lens, seq_lens, heads, kv_heads, hd, bs, window, reverse):
    attn, inputs, ref = attention_case(dtype, q_lens, seq_lens, heads, kv_heads, hd, bs, window,
                                       sum(seq_lens) * 3 + hd)
    T = sum(q_lens)
    pre = _core.ops.PagedAttentionPrefillArgs()
    pre.attn, pre.max_query_len = attn, max(q_lens)
    out = Guarded((T, heads * hd))
    sim(f"paged_attention_prefill_{dtype}", pre, inputs + [out.array], reverse)
    np.testing.assert_allclose(out.array, ref, rtol=1e-4, atol=3e-5)
    out.check_guards()


@ORDERS
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_attention_softcap_on_every_path(dtype, reverse):
    """Gemma 2's softcapped scores through the per-row, fused decode, split-and-reduce and tiled prefill kernels."""
    q_lens, seq_lens, heads, kv_heads, hd, bs, window = [20, 1, 33], [50, 7, 33], 9, 3, 64, 16, 7
    a, inputs, ref = attention_case(dtype, q_lens, seq_lens, heads, kv_heads, hd, bs, window, 5, softcap=1.5)
    _, _, plain = attention_case(dtype, q_lens, seq_lens, heads, kv_heads, hd, bs, window, 5)
    assert np.abs(ref - plain).max() > 1e-2  # the cap changes the result
    T = sum(q_lens)
    out = Guarded((T, heads * hd))
    sim(f"paged_attention_{dtype}", a, inputs + [out.array], reverse)
    np.testing.assert_allclose(out.array, ref, rtol=1e-4, atol=2e-5)
    pre = _core.ops.PagedAttentionPrefillArgs()
    pre.attn, pre.max_query_len = a, max(q_lens)
    out = Guarded((T, heads * hd))
    sim(f"paged_attention_prefill_{dtype}", pre, inputs + [out.array], reverse)
    np.testing.assert_allclose(out.array, ref, rtol=1e-4, atol=3e-5)
    P = -(-max(seq_lens) // 16)
    split = _core.ops.PagedAttentionSplitArgs()
    split.attn, split.partition_size, split.max_partitions = a, 16, P
    pmax, psum, pout = np.zeros((T, heads, P), np.float32), np.zeros((T, heads, P), np.float32), np.zeros(
        (T, heads, P, hd), np.float32)
    sim(f"paged_attention_split_{dtype}", split, inputs + [pmax, psum, pout], reverse)
    red = _core.ops.PagedAttentionReduceArgs()
    red.num_tokens, red.num_heads, red.head_dim, red.max_partitions = T, heads, hd, P
    out = Guarded((T, heads * hd))
    sim("paged_attention_reduce", red, [pmax, psum, pout, out.array], reverse)
    np.testing.assert_allclose(out.array, ref, rtol=1e-4, atol=2e-5)
    # decode: one token per sequence, the KV write fused (slots -1: attend over what the cache holds)
    d_lens = [9, 40]
    attn, (q, kc, vc, bt, qsl, lens), dref = attention_case(dtype, [1, 1], d_lens, heads, kv_heads, hd, bs, 0, 6,
                                                           softcap=1.5)
    dec = _core.ops.PagedAttentionDecodeArgs()
    dec.attn, dec.k_stride, dec.v_stride, dec.num_slots = attn, kv_heads * hd, kv_heads * hd, kc.shape[0] * bs
    kv = np.zeros((2, kv_heads * hd), np.float32)
    out = Guarded((2, heads * hd))
    sim(f"paged_attention_decode_{dtype}", dec, [q, kv, kv, np.full(2, -1, np.int64), kc, vc, bt, qsl, lens, out.array],
        reverse)
    np.testing.assert_allclose(out.array, dref, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("heads,hd,message", [
    (2, 320, "head_dim <= 256"),                                # past the wide-head pipelines
    (8, 256, "at most 1024 dims over a KV head's query heads"),  # 8 heads of 256: past the registers' budget
])
def test_paged_attention_limits_are_refused(heads, hd, message):
    a = args("PagedAttentionArgs", num_seqs=1, num_heads=heads, num_kv_heads=1, head_dim=hd, block_size=16,
             block_table_width=1, q_stride=heads * hd, sliding_window=0, scale=1.0, num_tokens=1)
    z = np.zeros(1, np.float32)
    with pytest.raises(ValueError, match=message):
        sim("paged_attention_f32", a, [z, z, z, z, z, z, z], False)
    pre = _core.ops.PagedAttentionPrefillArgs()
    pre.attn, pre.max_query_len = args("PagedAttentionArgs", num_seqs=1, num_heads=2, num_kv_heads=1, head_dim=256,
                                       block_size=16, block_table_width=1, q_stride=512, num_tokens=1), 16
    with pytest.raises(ValueError, match="a multiple of 8, at most 128"):  # the tiled kernel: 128 at most
        sim("paged_attention_prefill_f32", pre, [z, z, z, z, z, z, z], False)


def msl_functions(kernel):
    """The MSL functions behind a kernel name of the op table: matmul_* is a GEMV and a GEMM function (and, with
    16-bit activations, their _logits flavour writing f32)."""
    if not kernel.startswith("matmul_"):
        return {kernel}
    x = kernel[len("matmul_"):]
    names = {f"matmul_gemv_{x}", f"matmul_gemm_{x}"}
    return names | ({f"{n}_logits" for n in names} if "_act_" in x else set())


@pytest.mark.skipif(not EMULATOR, reason="the emulator's registry")
def test_every_kernel_is_registered_and_tested_here():
    """The emulator holds exactly the MSL functions of the op table (src/core/op_table.h); the _act_ ones are each
    launched by test_metal_kernels_16bit_activations.py, whose ACT_KERNELS must name them all."""
    from test_metal_kernels_16bit_activations import ACT_KERNELS

    want = set().union(*(msl_functions(k) for op in _core.ops.op_table() for k in op["metal_kernels"]))
    assert set(_core.metal_sim.kernel_names()) == want
    assert ACT_KERNELS == {k for k in want if "_act_" in k}


@pytest.mark.skipif(not EMULATOR, reason="the emulator's function constants")
def test_function_constants_are_per_thread():
    """rms_norm's residual add is a function constant: two threads dispatching it at once with different
    values each get their own (metal-sim keeps a dispatch's constants in its own thread)."""
    import threading

    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 300)).astype(np.float32)
    res0 = rng.standard_normal((64, 300)).astype(np.float32)
    w = to_storage(np.ones(300), "f32")
    results, errors = {}, []

    def worker(add):
        try:
            a = args("RmsNormArgs", rows=64, dim=300, eps=1e-5, add_residual=int(add))
            for _ in range(20):
                res, out = res0.copy(), np.zeros_like(x)
                _core.metal_sim.run("rms_norm_f32", a, [x, res if add else None, w, out], False)
                src = res0 + x if add else x
                ref = src / np.sqrt((src.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5)
                np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)
            results[add] = True
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(add,)) for add in (False, True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert results == {False: True, True: True}
