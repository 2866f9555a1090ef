"""The kernels' 16-bit-activation variants (<op>_<wdt>_act_<wdt>, <op>_act_<adt>): activations in f16 or bf16,
weights and KV cache in the same type, f32 accumulation. Each against the cpu backend's op (f32 activations)
fed the same rounded inputs, with guard bands, in both thread orders and through the Metal backend. Outputs
differ from the reference by the rounding of the output to the 16-bit type (and of any intermediate the
kernel stores, such as the residual sum)."""

import numpy as np
import pytest

from metal_engine import _core
from op_testing import QUANT_FORMATS, Guarded, args, from_storage, random_quant_rows, to_storage
from test_metal_sim_kernels import (ATTENTION_CASES, DECODE_CASES, ORDERS, PREFILL_CASES, SPLIT_CASES, attention_case,
                                    cpu)
from test_metal_sim_kernels import sim as sim_any

# Every 16-bit-activation kernel, each launched by a test below (sim() refuses a name not listed here, and
# test_metal_sim_kernels.py checks this list against the emulator's registry).
ACT_KERNELS = {
    "embedding_f16_act_f16", "embedding_bf16_act_bf16",
    "rms_norm_f16_act_f16", "rms_norm_bf16_act_bf16",
    "matmul_gemv_f16_act_f16", "matmul_gemv_bf16_act_bf16",
    "matmul_gemm_f16_act_f16", "matmul_gemm_bf16_act_bf16",
    "matmul_gemv_f16_act_f16_logits", "matmul_gemv_bf16_act_bf16_logits",
    "matmul_gemm_f16_act_f16_logits", "matmul_gemm_bf16_act_bf16_logits",
    "rope_act_f16", "rope_act_bf16",
    "qk_norm_f16_act_f16", "qk_norm_bf16_act_bf16",
    "silu_mul_act_f16", "silu_mul_act_bf16",
    "gelu_tanh_mul_act_f16", "gelu_tanh_mul_act_bf16",
    "moe_matmul_f16_act_f16", "moe_matmul_bf16_act_bf16", "moe_combine_act_f16", "moe_combine_act_bf16",
    "gather_rows_act_f16", "gather_rows_act_bf16",
    "kv_write_f16_act_f16", "kv_write_bf16_act_bf16",
    "paged_attention_f16_act_f16", "paged_attention_bf16_act_bf16",
    "paged_attention_prefill_f16_act_f16", "paged_attention_prefill_bf16_act_bf16",
    "paged_attention_split_f16_act_f16", "paged_attention_split_bf16_act_bf16",
    "paged_attention_reduce_act_f16", "paged_attention_reduce_act_bf16",
    "paged_attention_decode_f16_act_f16", "paged_attention_decode_bf16_act_bf16",
}
# the quantized formats' (matmul_quant.metal, moe.metal): each launched by the test_*_quantized tests below
ACT_KERNELS |= {f"{kernel}_{q}_act_{a}{suffix}" for q in QUANT_FORMATS for a in ("f16", "bf16")
                for kernel, suffix in [("matmul_gemv", ""), ("matmul_gemm", ""), ("matmul_gemv", "_logits"),
                                       ("matmul_gemm", "_logits"), ("embedding", ""), ("moe_matmul", "")]}


def sim(kernel, a, buffers, reverse):
    assert kernel in ACT_KERNELS, kernel
    sim_any(kernel, a, buffers, reverse)

ACTS = pytest.mark.parametrize("act", ["f16", "bf16"])
TOL = {"f16": 2e-3, "bf16": 1.6e-2}  # a few units of the last place of the 16-bit type, relative
STORAGE = {"f16": np.float16, "bf16": np.uint16}


def rounded(x, act):
    """x in the activation type (what the kernel reads) and the f32 values it holds (what the cpu op reads)."""
    s = to_storage(x, act)
    return s, from_storage(s, act).astype(np.float32)


def out16(shape, act, fill=None):
    return Guarded(shape, dtype=STORAGE[act], fill=fill)


def close(g, ref, act, scale=1.0):
    got = from_storage(g.array, act)
    np.testing.assert_allclose(got, ref, rtol=TOL[act], atol=TOL[act] * scale)
    g.check_guards()


@ORDERS
@ACTS
@pytest.mark.parametrize("tokens,hidden,vocab", [(1, 1, 1), (5, 7, 11), (3, 576, 49)])
def test_embedding(act, tokens, hidden, vocab, reverse):
    rng = np.random.default_rng(tokens + hidden)
    table = to_storage(rng.standard_normal((vocab, hidden)), act)
    ids = rng.integers(0, vocab, tokens).astype(np.int32)
    a = args("EmbeddingArgs", num_tokens=tokens, hidden=hidden, vocab=vocab, scale=1.0)
    out = out16((tokens, hidden), act)
    sim(f"embedding_{act}_act_{act}", a, [ids, table, out.array], reverse)
    np.testing.assert_array_equal(out.array, table[ids])  # a 16-bit row copied into 16-bit activations: exact
    out.check_guards()


@ORDERS
@ACTS
@pytest.mark.parametrize("rows,dim", [(1, 1), (3, 7), (5, 576), (4, 300)])
@pytest.mark.parametrize("add_residual", [False, True])
def test_rms_norm(act, rows, dim, add_residual, reverse):
    rng = np.random.default_rng(rows * 7 + dim)
    x, xf = rounded(rng.standard_normal((rows, dim)), act)
    res, resf = rounded(rng.standard_normal((rows, dim)), act)
    w = to_storage(1 + 0.1 * rng.standard_normal(dim), act)
    a = args("RmsNormArgs", rows=rows, dim=dim, eps=1e-5, add_residual=int(add_residual))
    ref_out, ref_res = np.zeros_like(xf), resf.copy()
    cpu(f"rms_norm_{act}", a, [xf, ref_res if add_residual else None, w, ref_out])
    out, sim_res = out16((rows, dim), act), out16((rows, dim), act, fill=res)
    sim(f"rms_norm_{act}_act_{act}", a, [x, sim_res.array if add_residual else None, w, out.array], reverse)
    close(out, ref_out, act)
    close(sim_res, ref_res, act)


@ORDERS
@ACTS
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (1, 37, 64), (3, 50, 33), (4, 64, 576), (5, 17, 9), (33, 70, 130)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("logits", [False, True])
def test_matmul(act, m, n, k, bias, logits, reverse):
    rng = np.random.default_rng(m * 1000 + n * 10 + k)
    x, xf = rounded(rng.standard_normal((m, k)), act)
    w = to_storage(rng.standard_normal((n, k)), act)
    b = to_storage(rng.standard_normal(n), act) if bias else None
    a = args("MatmulArgs", m=m, n=n, k=k, has_bias=int(bias))
    ref = np.zeros((m, n), np.float32)
    cpu(f"matmul_{act}", a, [xf, w, b, ref])
    prefix = _core.ops.metal_matmul_kernel_prefix(a)
    kernel = f"{prefix}_{act}_act_{act}" + ("_logits" if logits else "")
    y = Guarded((m, n)) if logits else out16((m, n), act)
    sim(kernel, a, [x, w, b, y.array], reverse)
    if logits:  # f32 out: only the accumulation order differs
        np.testing.assert_allclose(y.array, ref, rtol=1e-5, atol=1e-4 * np.sqrt(k))
        y.check_guards()
    else:
        close(y, ref, act, scale=np.sqrt(k))


@ORDERS
@ACTS
@pytest.mark.parametrize("fmt", list(QUANT_FORMATS))
@pytest.mark.parametrize("m,n,k,bias", [(1, 17, 256, None), (3, 40, 512, "f16"), (37, 33, 256, "bf16"), (5, 8, 512, "f32")])
@pytest.mark.parametrize("logits", [False, True])
def test_matmul_quantized(act, fmt, m, n, k, bias, logits, reverse):
    """matmul_<q>_act_<adt> (GEMV up to 4 rows, GEMM beyond; _logits writes f32) against the cpu's matmul_<q> on
    the same rounded x; the bias in any float type (has_bias = 1 + its dtype)."""
    if k % QUANT_FORMATS[fmt]["block_elems"]:
        pytest.skip("k is not whole blocks")
    rng = np.random.default_rng([m, n, k, QUANT_FORMATS[fmt]["block_bytes"]])
    x, xf = rounded(rng.standard_normal((m, k)), act)
    w = random_quant_rows(fmt, n, k, rng)
    b = to_storage(rng.standard_normal(n), bias) if bias else None
    a = args("MatmulArgs", m=m, n=n, k=k, has_bias=1 + ["f32", "f16", "bf16"].index(bias) if bias else 0)
    ref = np.zeros((m, n), np.float32)
    cpu(f"matmul_{fmt}", a, [xf, w, b, ref])
    prefix = _core.ops.metal_matmul_kernel_prefix(a)
    y = Guarded((m, n)) if logits else out16((m, n), act)
    sim(f"{prefix}_{fmt}_act_{act}" + ("_logits" if logits else ""), a, [x, w, b, y.array], reverse)
    scale = np.abs(ref).max()  # the cpu's int16 activations round x by ~1e-5 of a chunk's largest value
    if logits:
        np.testing.assert_allclose(y.array, ref, rtol=1e-4, atol=1e-4 * scale)
        y.check_guards()
    else:
        close(y, ref, act, scale=scale)


@ORDERS
@ACTS
@pytest.mark.parametrize("fmt", list(QUANT_FORMATS))
def test_embedding_quantized(act, fmt, reverse):
    rng = np.random.default_rng(QUANT_FORMATS[fmt]["block_bytes"])
    tokens, hidden, vocab = 5, 512, 9
    table = random_quant_rows(fmt, vocab, hidden, rng)
    ids = rng.integers(0, vocab, tokens).astype(np.int32)
    a = args("EmbeddingArgs", num_tokens=tokens, hidden=hidden, vocab=vocab, scale=3.0)
    ref = np.zeros((tokens, hidden), np.float32)
    cpu(f"embedding_{fmt}", a, [ids, table, ref])
    out = out16((tokens, hidden), act)
    sim(f"embedding_{fmt}_act_{act}", a, [ids, table, out.array], reverse)
    close(out, ref, act)


@ORDERS
@ACTS
@pytest.mark.parametrize("fmt", list(QUANT_FORMATS))
def test_moe_matmul_quantized(act, fmt, reverse):
    rng = np.random.default_rng(QUANT_FORMATS[fmt]["block_bytes"] + 1)
    tokens, k, experts, n, kdim, div = 5, 2, 4, 17, 256, 2
    rows = tokens * k
    x, xf = rounded(rng.standard_normal((rows // div, kdim)), act)
    w = random_quant_rows(fmt, experts * n, kdim, rng)
    ids = rng.integers(0, experts, rows).astype(np.int32)
    a = args("MoeMatmulArgs", rows=rows, n=n, k=kdim, num_experts=experts, x_row_div=div)
    ref = np.zeros((rows, n), np.float32)
    cpu(f"moe_matmul_{fmt}", a, [xf, w, ids, ref])
    y = out16((rows, n), act)
    sim(f"moe_matmul_{fmt}_act_{act}", a, [x, w, ids, y.array], reverse)
    close(y, ref, act, scale=np.abs(ref).max())


@ORDERS
@ACTS
@pytest.mark.parametrize("tokens,k,experts,n,kdim,div", [(1, 2, 8, 24, 16, 2), (5, 2, 4, 17, 40, 1)])
def test_moe_matmul(act, tokens, k, experts, n, kdim, div, reverse):
    rng = np.random.default_rng(tokens + n)
    rows = tokens * k
    x, xf = rounded(rng.standard_normal((rows // div, kdim)), act)
    w = to_storage(rng.standard_normal((experts, n, kdim)) * 0.2, act)
    ids = rng.integers(0, experts, rows).astype(np.int32)
    a = args("MoeMatmulArgs", rows=rows, n=n, k=kdim, num_experts=experts, x_row_div=div)
    ref = np.zeros((rows, n), np.float32)
    cpu(f"moe_matmul_{act}", a, [xf, w, ids, ref])
    y = out16((rows, n), act)
    sim(f"moe_matmul_{act}_act_{act}", a, [x, w, ids, y.array], reverse)
    close(y, ref, act, scale=np.sqrt(kdim))


@ORDERS
@ACTS
@pytest.mark.parametrize("tokens,k,dim", [(1, 1, 3), (4, 2, 300)])
def test_moe_combine(act, tokens, k, dim, reverse):
    rng = np.random.default_rng(dim)
    y, yf = rounded(rng.standard_normal((tokens * k, dim)), act)
    w = rng.random((tokens, k)).astype(np.float32)
    a = args("MoeCombineArgs", num_tokens=tokens, top_k=k, dim=dim)
    ref = np.zeros((tokens, dim), np.float32)
    cpu("moe_combine", a, [yf, w, ref])
    out = out16((tokens, dim), act)
    sim(f"moe_combine_act_{act}", a, [y, w, out.array], reverse)
    close(out, ref, act)


@ORDERS
@ACTS
@pytest.mark.parametrize("tokens,heads,kv_heads,hd", [(1, 1, 1, 2), (5, 4, 2, 24), (2, 2, 1, 256)])
def test_qk_norm(act, tokens, heads, kv_heads, hd, reverse):
    rng = np.random.default_rng(tokens * hd)
    q, qf = rounded(rng.standard_normal((tokens, heads * hd)) * 3, act)
    k, kf = rounded(rng.standard_normal((tokens, kv_heads * hd)) * 3, act)
    qw, kw = (to_storage(1 + 0.1 * rng.standard_normal(hd), act) for _ in range(2))
    a = args("QKNormArgs", num_tokens=tokens, num_heads=heads, num_kv_heads=kv_heads, head_dim=hd,
             q_stride=heads * hd, k_stride=kv_heads * hd, eps=1e-6)
    cpu(f"qk_norm_{act}", a, [qf, kf, qw, kw])
    gq, gk = out16(q.shape, act, fill=q), out16(k.shape, act, fill=k)
    sim(f"qk_norm_{act}_act_{act}", a, [gq.array, gk.array, qw, kw], reverse)
    close(gq, qf, act)
    close(gk, kf, act)


@ORDERS
@ACTS
@pytest.mark.parametrize("tokens,heads,kv_heads,hd", [(1, 1, 1, 2), (5, 4, 2, 16), (3, 2, 1, 128)])
def test_rope(act, tokens, heads, kv_heads, hd, reverse):
    rng = np.random.default_rng(tokens * hd)
    pos = rng.integers(0, 5000, tokens).astype(np.int32)
    inv_freq = (1.0 / 10000 ** (np.arange(0, hd, 2) / hd)).astype(np.float32)
    q, qf = rounded(rng.standard_normal((tokens, heads * hd)), act)
    k, kf = rounded(rng.standard_normal((tokens, kv_heads * hd)), act)
    a = args("RopeArgs", num_tokens=tokens, num_heads=heads, num_kv_heads=kv_heads, head_dim=hd, rotary_dim=hd,
             q_stride=heads * hd, k_stride=kv_heads * hd, scaling=1.0)
    cpu("rope", a, [pos, inv_freq, qf, kf])
    gq, gk = out16(q.shape, act, fill=q), out16(k.shape, act, fill=k)
    sim(f"rope_act_{act}", a, [pos, inv_freq, gq.array, gk.array], reverse)
    close(gq, qf, act)
    close(gk, kf, act)


@ORDERS
@ACTS
@pytest.mark.parametrize("rows,dim", [(1, 1), (3, 7), (2, 1000)])
@pytest.mark.parametrize("op", ["silu_mul", "gelu_tanh_mul"])
def test_silu_mul(op, act, rows, dim, reverse):
    rng = np.random.default_rng(dim)
    g, gf = rounded(4 * rng.standard_normal((rows, dim)), act)
    u, uf = rounded(rng.standard_normal((rows, dim)), act)
    a = args("SiluMulArgs", rows=rows, dim=dim, in_stride=dim)
    ref = np.zeros_like(gf)
    cpu(op, a, [gf, uf, ref])
    out = out16((rows, dim), act)
    sim(f"{op}_act_{act}", a, [g, u, out.array], reverse)
    close(out, ref, act)


@ORDERS
@ACTS
@pytest.mark.parametrize("rows,dim", [(1, 1), (3, 17), (8, 576)])
def test_gather_rows(act, rows, dim, reverse):
    rng = np.random.default_rng(rows)
    src = to_storage(rng.standard_normal((11, dim)), act)
    idx = rng.integers(0, 11, rows).astype(np.int32)
    out = out16((rows, dim), act)
    sim(f"gather_rows_act_{act}", args("GatherRowsArgs", rows=rows, dim=dim), [src, idx, out.array], reverse)
    np.testing.assert_array_equal(out.array, src[idx])
    out.check_guards()


@ORDERS
@ACTS
def test_kv_write(act, reverse):
    rng = np.random.default_rng(3)
    tokens, kv_heads, hd, bs, blocks = 6, 3, 24, 5, 4
    slots = rng.permutation(blocks * bs)[:tokens].astype(np.int64)
    slots[2] = -1
    k, kf = rounded(rng.standard_normal((tokens, kv_heads * hd)), act)
    v, vf = rounded(rng.standard_normal((tokens, kv_heads * hd)), act)
    a = args("KVWriteArgs", num_tokens=tokens, num_kv_heads=kv_heads, head_dim=hd, block_size=bs,
             num_slots=blocks * bs, k_stride=kv_heads * hd, v_stride=kv_heads * hd)
    ref_k = np.zeros((blocks, bs, kv_heads, hd), STORAGE[act])
    ref_v = np.zeros_like(ref_k)
    cpu(f"kv_write_{act}", a, [kf, vf, slots, ref_k, ref_v])
    kc, vc = out16(ref_k.shape, act), out16(ref_v.shape, act)
    sim(f"kv_write_{act}_act_{act}", a, [k, v, slots, kc.array, vc.array], reverse)
    np.testing.assert_array_equal(kc.array, ref_k)  # a 16-bit value stored in the same type: exact
    np.testing.assert_array_equal(vc.array, ref_v)
    kc.check_guards()
    vc.check_guards()


def attention_inputs(act, case, seed):
    """An attention case with q rounded to the activation type, and the cpu op's output for that q."""
    q_lens, seq_lens, heads, kv_heads, hd, bs, window = case
    a, (q, kc, vc, bt, qsl, lens), _ = attention_case(act, q_lens, seq_lens, heads, kv_heads, hd, bs, window, seed)
    q16, qf = rounded(q, act)
    ref = np.zeros((sum(q_lens), heads * hd), np.float32)
    cpu(f"paged_attention_{act}", a, [qf, kc, vc, bt, qsl, lens, ref])
    return a, q16, [kc, vc, bt, qsl, lens], ref


@ORDERS
@ACTS
@pytest.mark.parametrize("case", ATTENTION_CASES[:6])
def test_paged_attention(act, case, reverse):
    a, q, rest, ref = attention_inputs(act, case, sum(case[1]))
    out = out16(ref.shape, act)
    sim(f"paged_attention_{act}_act_{act}", a, [q] + rest + [out.array], reverse)
    close(out, ref, act)


@ORDERS
@ACTS
@pytest.mark.parametrize("case", PREFILL_CASES[-3:])
def test_paged_attention_prefill(act, case, reverse):
    a, q, rest, ref = attention_inputs(act, case, sum(case[1]) + 1)
    pre = _core.ops.PagedAttentionPrefillArgs()
    pre.attn, pre.max_query_len = a, max(case[0])
    out = out16(ref.shape, act)
    sim(f"paged_attention_prefill_{act}_act_{act}", pre, [q] + rest + [out.array], reverse)
    close(out, ref, act)


@ORDERS
@ACTS
@pytest.mark.parametrize("case", SPLIT_CASES[:2])
def test_paged_attention_split_and_reduce(act, case, reverse):
    *attn_case, psize = case
    a, q, rest, ref = attention_inputs(act, tuple(attn_case), sum(case[1]) + 2)
    T, heads, hd = ref.shape[0], a.num_heads, a.head_dim
    P = -(-max(case[1]) // psize)
    split = _core.ops.PagedAttentionSplitArgs()
    split.attn, split.partition_size, split.max_partitions = a, psize, P
    pmax, psum, pout = Guarded((T, heads, P)), Guarded((T, heads, P)), Guarded((T, heads, P, hd))
    sim(f"paged_attention_split_{act}_act_{act}", split, [q] + rest + [pmax.array, psum.array, pout.array], reverse)
    red = _core.ops.PagedAttentionReduceArgs()
    red.num_tokens, red.num_heads, red.head_dim, red.max_partitions = T, heads, hd, P
    out = out16(ref.shape, act)
    sim(f"paged_attention_reduce_act_{act}", red, [pmax.array, psum.array, pout.array, out.array], reverse)
    close(out, ref, act)


@ORDERS
@ACTS
@pytest.mark.parametrize("seq_lens,heads,kv_heads,hd,bs,window", DECODE_CASES[1:4])
def test_paged_attention_decode(act, seq_lens, heads, kv_heads, hd, bs, window, reverse):
    T = len(seq_lens)
    a, (q, kc, vc, bt, qsl, lens), _ = attention_case(act, [1] * T, seq_lens, heads, kv_heads, hd, bs, window, 5)
    rng = np.random.default_rng(hd)
    q16, qf = rounded(q, act)
    k, kf = rounded(rng.standard_normal((T, kv_heads * hd)), act)
    v, vf = rounded(rng.standard_normal((T, kv_heads * hd)), act)
    slots = np.array([bt[s_, (n - 1) // bs] * bs + (n - 1) % bs for s_, n in enumerate(seq_lens)], np.int64)
    num_slots = kc.shape[0] * bs
    write = args("KVWriteArgs", num_tokens=T, num_kv_heads=kv_heads, head_dim=hd, block_size=bs, num_slots=num_slots,
                 k_stride=kv_heads * hd, v_stride=kv_heads * hd)
    ref_k, ref_v = kc.copy(), vc.copy()
    cpu(f"kv_write_{act}", write, [kf, vf, slots, ref_k, ref_v])
    ref = np.zeros((T, heads * hd), np.float32)
    cpu(f"paged_attention_{act}", a, [qf, ref_k, ref_v, bt, qsl, lens, ref])
    dec = _core.ops.PagedAttentionDecodeArgs()
    dec.attn, dec.k_stride, dec.v_stride, dec.num_slots = a, kv_heads * hd, kv_heads * hd, num_slots
    gk, gv = Guarded(kc.shape, dtype=kc.dtype, fill=kc), Guarded(vc.shape, dtype=vc.dtype, fill=vc)
    out = out16(ref.shape, act)
    sim(f"paged_attention_decode_{act}_act_{act}", dec, [q16, k, v, slots, gk.array, gv.array, bt, qsl, lens, out.array],
        reverse)
    np.testing.assert_array_equal(gk.array, ref_k)
    np.testing.assert_array_equal(gv.array, ref_v)
    close(out, ref, act)
