"""The .metal kernels against the cpu backend's op (the reference), over dtypes and odd shapes, with guard
bands around outputs: on metal-sim's CPU emulator, with threads run first-to-last and last-to-first; on a
Mac without the emulator, on the real Metal device through the Metal backend (the macOS workflow)."""

import numpy as np
import pytest

from metal_engine import _core
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


@ORDERS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,dim", [(1, 1), (3, 7), (2, 64), (5, 576), (4, 300)])
@pytest.mark.parametrize("add_residual", [False, True])
def test_rms_norm(dtype, rows, dim, add_residual, reverse):
    rng = np.random.default_rng(rows * 7 + dim)
    x = rng.standard_normal((rows, dim)).astype(np.float32)
    res = rng.standard_normal((rows, dim)).astype(np.float32)
    w = to_storage(1 + 0.1 * rng.standard_normal(dim), dtype)
    a = args("RmsNormArgs", rows=rows, dim=dim, eps=1e-5, add_residual=int(add_residual))
    ref_out, ref_res = np.zeros_like(x), res.copy()
    cpu(f"rms_norm_{dtype}", a, [x, ref_res if add_residual else None, w, ref_out])
    out, sim_res = Guarded((rows, dim)), Guarded((rows, dim), fill=res)
    sim(f"rms_norm_{dtype}", a, [x, sim_res.array if add_residual else None, w, out.array], reverse)
    np.testing.assert_allclose(out.array, ref_out, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(sim_res.array, ref_res, rtol=1e-6, atol=1e-6)
    out.check_guards()
    sim_res.check_guards()


@ORDERS
@pytest.mark.parametrize("rows,dim,fused", [(1, 1, False), (3, 7, False), (9, 1536, False), (2, 1000, False),
                                            (3, 7, True), (4, 1536, True)])
@pytest.mark.parametrize("op", ["silu_mul", "gelu_tanh_mul"])
def test_silu_mul(op, rows, dim, fused, reverse):
    """fused: gate and up are the two halves of one [rows, 2 * dim] array (in_stride = 2 * dim)."""
    rng = np.random.default_rng(dim)
    stride = 2 * dim if fused else dim
    gu = rng.standard_normal((rows, 2 * dim)).astype(np.float32)
    gu[:, :dim] *= 4
    if fused:
        g, u = gu, gu.ravel()[dim:]
    else:
        g, u = np.ascontiguousarray(gu[:, :dim]), np.ascontiguousarray(gu[:, dim:])
    a = args("SiluMulArgs", rows=rows, dim=dim, in_stride=stride)
    ref = np.zeros((rows, dim), np.float32)
    cpu(op, a, [g, u, ref])
    out = Guarded((rows, dim))
    sim(op, a, [g, u, out.array], reverse)
    np.testing.assert_allclose(out.array, ref, rtol=2e-6, atol=1e-6)
    out.check_guards()


@ORDERS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden,vocab", [(1, 1, 1), (5, 7, 11), (33, 64, 1000), (3, 576, 49)])
@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_embedding(dtype, tokens, hidden, vocab, scale, reverse):
    rng = np.random.default_rng(tokens + hidden)
    table = to_storage(rng.standard_normal((vocab, hidden)), dtype)
    ids = rng.integers(0, vocab, tokens).astype(np.int32)
    a = args("EmbeddingArgs", num_tokens=tokens, hidden=hidden, vocab=vocab, scale=scale)
    ref = np.zeros((tokens, hidden), np.float32)
    cpu(f"embedding_{dtype}", a, [ids, table, ref])
    out = Guarded((tokens, hidden))
    sim(f"embedding_{dtype}", a, [ids, table, out.array], reverse)
    np.testing.assert_array_equal(out.array, ref)
    out.check_guards()


@ORDERS
@pytest.mark.parametrize("rows,dim", [(1, 1), (3, 17), (8, 576)])
def test_gather_rows(rows, dim, reverse):
    rng = np.random.default_rng(rows)
    src = rng.standard_normal((11, dim)).astype(np.float32)
    idx = rng.integers(0, 11, rows).astype(np.int32)
    a = args("GatherRowsArgs", rows=rows, dim=dim)
    out = Guarded((rows, dim))
    sim("gather_rows", a, [src, idx, out.array], reverse)
    ref = np.zeros((rows, dim), np.float32)
    cpu("gather_rows", a, [src, idx, ref])
    np.testing.assert_array_equal(out.array, ref)
    out.check_guards()


@ORDERS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,heads,kv_heads,hd", [(1, 1, 1, 2), (5, 4, 2, 24), (3, 9, 3, 64), (2, 2, 1, 256)])
def test_qk_norm(dtype, tokens, heads, kv_heads, hd, reverse):
    """q and k with the row stride of fused qkv rows (the strides the engine passes); separate arrays, as the
    emulator and the backend copy each buffer in and out."""
    rng = np.random.default_rng(tokens * hd + heads)
    stride = (heads + 2 * kv_heads) * hd
    qkv = rng.standard_normal((tokens, stride)).astype(np.float32) * 3
    qw, kw = (to_storage(1 + 0.1 * rng.standard_normal(hd), dtype) for _ in range(2))
    a = args("QKNormArgs", num_tokens=tokens, num_heads=heads, num_kv_heads=kv_heads, head_dim=hd, q_stride=stride,
             k_stride=stride, eps=1e-6)
    ref_q, ref_k = qkv.copy(), qkv.copy()
    cpu(f"qk_norm_{dtype}", a, [ref_q, ref_k.ravel()[heads * hd:], qw, kw])
    got_q, got_k = Guarded(qkv.shape, fill=qkv), Guarded(qkv.shape, fill=qkv)
    sim(f"qk_norm_{dtype}", a, [got_q.array, got_k.array.ravel()[heads * hd:], qw, kw], reverse)
    np.testing.assert_allclose(got_q.array, ref_q, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got_k.array, ref_k, rtol=2e-5, atol=2e-5)
    got_q.check_guards()
    got_k.check_guards()


@ORDERS
@pytest.mark.parametrize("tokens,experts,k,renormalize", [(1, 2, 1, 0), (5, 8, 2, 1), (9, 60, 4, 0), (3, 128, 8, 1)])
def test_moe_route(tokens, experts, k, renormalize, reverse):
    rng = np.random.default_rng(tokens * experts)
    logits = (3 * rng.standard_normal((tokens, experts))).astype(np.float32)
    logits[0, :2] = logits[0].max() + 1.0  # a tie at the top: the lower id wins
    a = args("MoeRouteArgs", num_tokens=tokens, num_experts=experts, top_k=k, renormalize=renormalize)
    ref_ids, ref_w = np.zeros((tokens, k), np.int32), np.zeros((tokens, k), np.float32)
    cpu("moe_route", a, [logits, ref_ids, ref_w])
    ids, w = Guarded((tokens, k), np.int32), Guarded((tokens, k))
    sim("moe_route", a, [logits, ids.array, w.array], reverse)
    np.testing.assert_array_equal(ids.array, ref_ids)
    np.testing.assert_allclose(w.array, ref_w, rtol=1e-6, atol=1e-7)
    ids.check_guards()
    w.check_guards()


@ORDERS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,k,experts,n,kdim,div", [(1, 2, 8, 24, 16, 2), (3, 2, 8, 17, 33, 1), (7, 4, 16, 9, 70, 4)])
def test_moe_matmul(dtype, tokens, k, experts, n, kdim, div, reverse):
    rng = np.random.default_rng(tokens * 13 + n)
    rows = tokens * k
    x = rng.standard_normal((rows // div, kdim)).astype(np.float32)
    w = to_storage(rng.standard_normal((experts, n, kdim)) * 0.1, dtype)
    ids = rng.integers(0, experts, rows).astype(np.int32)
    ids[-1] = -1
    a = args("MoeMatmulArgs", rows=rows, n=n, k=kdim, num_experts=experts, x_row_div=div)
    ref = np.full((rows, n), np.nan, np.float32)
    cpu(f"moe_matmul_{dtype}", a, [x, w, ids, ref])
    y = Guarded((rows, n), fill=np.nan)
    sim(f"moe_matmul_{dtype}", a, [x, w, ids, y.array], reverse)
    np.testing.assert_allclose(y.array, ref, rtol=2e-5, atol=2e-5)
    y.check_guards()


@ORDERS
@pytest.mark.parametrize("tokens,k,dim", [(1, 1, 1), (5, 2, 33), (4, 8, 576)])
def test_moe_combine(tokens, k, dim, reverse):
    rng = np.random.default_rng(tokens + dim)
    y = rng.standard_normal((tokens * k, dim)).astype(np.float32)
    w = rng.random((tokens, k)).astype(np.float32)
    a = args("MoeCombineArgs", num_tokens=tokens, top_k=k, dim=dim)
    ref = np.zeros((tokens, dim), np.float32)
    cpu("moe_combine", a, [y, w, ref])
    out = Guarded((tokens, dim))
    sim("moe_combine", a, [y, w, out.array], reverse)
    np.testing.assert_allclose(out.array, ref, rtol=1e-6, atol=1e-6)
    out.check_guards()


@ORDERS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,kv_heads,hd,block_size,blocks", [(1, 1, 2, 1, 1), (7, 2, 16, 16, 3), (20, 3, 64, 8, 5)])
def test_kv_write(dtype, tokens, kv_heads, hd, block_size, blocks, reverse):
    rng = np.random.default_rng(tokens)
    num_slots = blocks * block_size
    slots = rng.permutation(num_slots)[:tokens].astype(np.int64)
    slots[0] = -1
    k = rng.standard_normal((tokens, kv_heads * hd)).astype(np.float32)
    v = rng.standard_normal((tokens, kv_heads * hd)).astype(np.float32)
    storage = to_storage(np.zeros(1), dtype).dtype
    a = args("KVWriteArgs", num_tokens=tokens, num_kv_heads=kv_heads, head_dim=hd, block_size=block_size,
             num_slots=num_slots, k_stride=kv_heads * hd, v_stride=kv_heads * hd)
    ref_k = np.zeros((blocks, block_size, kv_heads, hd), storage)
    ref_v = np.zeros_like(ref_k)
    cpu(f"kv_write_{dtype}", a, [k, v, slots, ref_k, ref_v])
    kc, vc = Guarded(ref_k.shape, dtype=storage), Guarded(ref_v.shape, dtype=storage)
    sim(f"kv_write_{dtype}", a, [k, v, slots, kc.array, vc.array], reverse)
    np.testing.assert_array_equal(kc.array, ref_k)
    np.testing.assert_array_equal(vc.array, ref_v)
    kc.check_guards()
    vc.check_guards()


@ORDERS
@pytest.mark.parametrize("tokens,heads,kv_heads,hd,rot,scaling",
                         [(1, 1, 1, 2, 2, 1.0), (5, 4, 2, 16, 16, 1.0), (7, 9, 3, 64, 64, 1.0), (3, 2, 1, 128, 128, 1.0),
                          (4, 3, 1, 96, 72, 1.0), (6, 2, 2, 64, 32, 1.19)])
def test_rope(tokens, heads, kv_heads, hd, rot, scaling, reverse):
    rng = np.random.default_rng(tokens * hd)
    pos = rng.integers(0, 5000, tokens).astype(np.int32)
    inv_freq = (1.0 / 10000 ** (np.arange(0, rot, 2) / rot)).astype(np.float32)
    q0 = rng.standard_normal((tokens, heads * hd)).astype(np.float32)
    k0 = rng.standard_normal((tokens, kv_heads * hd)).astype(np.float32)
    a = args("RopeArgs", num_tokens=tokens, num_heads=heads, num_kv_heads=kv_heads, head_dim=hd, rotary_dim=rot,
             q_stride=heads * hd, k_stride=kv_heads * hd, scaling=scaling)
    ref_q, ref_k = q0.copy(), k0.copy()
    cpu("rope", a, [pos, inv_freq, ref_q, ref_k])
    q, k = Guarded(q0.shape, fill=q0), Guarded(k0.shape, fill=k0)
    sim("rope", a, [pos, inv_freq, q.array, k.array], reverse)
    np.testing.assert_allclose(q.array, ref_q, atol=1e-5)
    np.testing.assert_allclose(k.array, ref_k, atol=1e-5)
    q.check_guards()
    k.check_guards()


MATMUL_SHAPES = [  # (m, n, k): GEMV rows (m <= 4) and GEMM tiles with their edges; k % 4 != 0 takes the scalar path
    (1, 1, 1), (1, 17, 7), (2, 33, 64), (4, 31, 130), (5, 16, 16), (7, 40, 33), (33, 65, 48), (64, 96, 100),
]


@ORDERS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", MATMUL_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_matmul(dtype, m, n, k, bias, reverse):
    rng = np.random.default_rng(m * 1000 + n * 10 + k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = to_storage(rng.standard_normal((n, k)), dtype)
    b = to_storage(rng.standard_normal(n), dtype) if bias else None
    a = args("MatmulArgs", m=m, n=n, k=k, has_bias=int(bias))
    ref = np.zeros((m, n), np.float32)
    cpu(f"matmul_{dtype}", a, [x, w, b, ref])
    kernel = {"matmul_gemv": f"matmul_gemv_{dtype}", "matmul_gemm": f"matmul_gemm_{dtype}"}[
        _core.ops.metal_matmul_kernel_prefix(a)]
    assert kernel.startswith("matmul_gemv" if m <= 4 else "matmul_gemm")
    y = Guarded((m, n))
    sim(kernel, a, [x, w, b, y.array], reverse)
    np.testing.assert_allclose(y.array, ref, rtol=1e-5, atol=1e-4 * np.sqrt(k))
    y.check_guards()


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


ATTENTION_CASES = [  # (q_lens, seq_lens, heads, kv_heads, head_dim, block_size, window)
    ([1], [1], 1, 1, 8, 1, 0),                    # smallest
    ([5, 1, 1], [5, 9, 33], 4, 2, 16, 4, 0),      # a prefill and two decode rows in one step
    ([7], [20], 8, 2, 64, 16, 0),                 # a chunk continuing over cached pages
    ([13, 2], [13, 40], 9, 3, 64, 16, 5),         # sliding window smaller than the prompt
    ([3, 1], [3, 70], 2, 1, 128, 8, 0),           # head_dim 128
    ([6], [6], 3, 3, 24, 5, 0),                   # MHA, odd block size and head_dim
    ([20, 1, 33], [50, 7, 33], 9, 3, 64, 16, 7),  # long chunks (the cpu op's sgemm path) with a window
    ([150], [170], 2, 1, 64, 8, 0),               # 150 queries after 20 cached tokens
]


@ORDERS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_lens,seq_lens,heads,kv_heads,hd,bs,window", ATTENTION_CASES)
def test_paged_attention(dtype, q_lens, seq_lens, heads, kv_heads, hd, bs, window, reverse):
    a, inputs, ref = attention_case(dtype, q_lens, seq_lens, heads, kv_heads, hd, bs, window, sum(seq_lens) + hd)
    T = sum(q_lens)
    out = Guarded((T, heads * hd))
    sim(f"paged_attention_{dtype}", a, inputs + [out.array], reverse)
    np.testing.assert_allclose(out.array, ref, rtol=1e-4, atol=2e-5)
    out.check_guards()


DECODE_CASES = [  # (seq_lens, heads, kv_heads, head_dim, block_size, window): one new token per sequence
    ([1], 1, 1, 8, 1, 0),
    ([9, 33, 2], 4, 2, 16, 4, 0),
    ([40, 17], 9, 3, 64, 16, 5),      # sliding window
    ([70], 2, 1, 128, 8, 0),
    ([6, 6, 11], 3, 3, 24, 5, 0),     # MHA, odd sizes
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


@ORDERS
@pytest.mark.parametrize("rows,cols,cap", [(1, 1, 30.0), (3, 211, 4.0), (2, 5000, 30.0)])
def test_softcap(rows, cols, cap, reverse):
    rng = np.random.default_rng(cols)
    x = (3 * cap * rng.standard_normal((rows, cols))).astype(np.float32)
    a = args("SoftcapArgs", rows=rows, cols=cols, cap=cap)
    ref = np.zeros_like(x)
    cpu("softcap", a, [x, ref])
    out = Guarded((rows, cols))
    sim("softcap", a, [x, out.array], reverse)
    np.testing.assert_allclose(out.array, ref, rtol=1e-6, atol=1e-6 * cap)
    out.check_guards()


@ORDERS
@pytest.mark.parametrize("rows,vocab", [(1, 1), (3, 7), (2, 49152), (4, 1000)])
def test_argmax(rows, vocab, reverse):
    rng = np.random.default_rng(vocab)
    x = rng.standard_normal((rows, vocab)).astype(np.float32)
    if vocab > 10:
        x[0, 5] = x[0, vocab - 3] = x[0].max() + 1  # a tie across threads: the first index wins
    a = args("ArgmaxArgs", rows=rows, vocab=vocab)
    ref = np.zeros(rows, np.int32)
    cpu("argmax", a, [x, ref])
    out = Guarded((rows,), dtype=np.int32)
    sim("argmax", a, [x, out.array], reverse)
    np.testing.assert_array_equal(out.array, ref)
    np.testing.assert_array_equal(out.array, x.argmax(-1))
    out.check_guards()


SPLIT_CASES = [  # (q_lens, seq_lens, heads, kv_heads, head_dim, block_size, window, partition_size)
    ([1, 1], [300, 77], 4, 2, 64, 16, 0, 64),      # decode rows over several partitions
    ([1, 1, 1], [513, 1, 129], 9, 3, 64, 16, 0, 128),
    ([1], [700], 2, 1, 128, 8, 100, 32),           # a window: most partitions see no key
    ([5, 1], [37, 90], 4, 4, 24, 5, 0, 16),        # prefill rows through the split path too
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


PREFILL_CASES = ATTENTION_CASES + [
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


def test_paged_attention_limits_are_refused():
    a = args("PagedAttentionArgs", num_seqs=1, num_heads=2, num_kv_heads=1, head_dim=256, block_size=16,
             block_table_width=1, q_stride=512, sliding_window=0, scale=1.0, num_tokens=1)
    z = np.zeros(1, np.float32)
    with pytest.raises(ValueError, match="head_dim <= 128"):
        sim("paged_attention_f32", a, [z, z, z, z, z, z, z], False)


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
