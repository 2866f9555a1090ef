"""The mixture-of-experts ops against float64 numpy: moe_route (softmax, top-k, renormalisation, ties),
moe_matmul (rows grouped by expert, both the gate/up and the down layout), moe_combine."""

import numpy as np
import pytest

from op_testing import DTYPES, Guarded, _core, args, from_storage, run, to_storage


def route_ref(logits, k, renormalize):
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ids = np.argsort(-p, axis=-1, kind="stable")[:, :k]  # stable: the lower id first on ties
    w = np.take_along_axis(p, ids, -1)
    if renormalize:
        w = w / w.sum(-1, keepdims=True)
    return ids, w


@pytest.mark.parametrize("tokens,experts,k", [(1, 2, 1), (5, 8, 2), (17, 60, 4), (3, 128, 8)])
@pytest.mark.parametrize("renormalize", [False, True])
def test_moe_route(dev, tokens, experts, k, renormalize):
    rng = np.random.default_rng(tokens * experts + k)
    logits = (3 * rng.standard_normal((tokens, experts))).astype(np.float32)
    logits[0, :2] = logits[0].max() + 1.0  # a tie at the top: the lower id wins
    ids, w = Guarded((tokens, k), np.int32), Guarded((tokens, k))
    run(dev, "moe_route", args("MoeRouteArgs", num_tokens=tokens, num_experts=experts, top_k=k,
                               renormalize=int(renormalize)), [logits, ids.array, w.array])
    ref_ids, ref_w = route_ref(logits.astype(np.float64), k, renormalize)
    np.testing.assert_array_equal(ids.array, ref_ids)
    np.testing.assert_allclose(w.array, ref_w, rtol=2e-6, atol=1e-7)
    ids.check_guards()
    w.check_guards()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,k,experts,n,kdim", [(1, 2, 8, 24, 16), (3, 2, 8, 17, 33), (20, 2, 4, 40, 64),
                                                     (9, 4, 16, 7, 130)])
@pytest.mark.parametrize("layout", ["gate_up", "down"])
def test_moe_matmul(dev, dtype, tokens, k, experts, n, kdim, layout):
    """gate_up: each token's row feeds its k slots (x_row_div = k); down: each slot has its own row."""
    rng = np.random.default_rng(tokens * 7 + n)
    rows = tokens * k
    div = k if layout == "gate_up" else 1
    x = rng.standard_normal((rows // div, kdim)).astype(np.float32)
    w = to_storage(rng.standard_normal((experts, n, kdim)) * 0.1, dtype)
    ids = rng.integers(0, experts, rows).astype(np.int32)
    ids[-1] = -1  # not an expert: a zero row
    y = Guarded((rows, n))
    run(dev, f"moe_matmul_{dtype}", args("MoeMatmulArgs", rows=rows, n=n, k=kdim, num_experts=experts, x_row_div=div),
        [x, w, ids, y.array])
    wf = from_storage(w, dtype)
    ref = np.stack([x[r // div].astype(np.float64) @ wf[e].T if 0 <= e < experts else np.zeros(n)
                    for r, e in enumerate(ids)])
    np.testing.assert_allclose(y.array, ref, rtol=1e-5, atol=1e-5 * np.sqrt(kdim))
    y.check_guards()


def test_moe_matmul_reads_each_selected_expert_once(dev):
    """Rows grouped by expert: 40 rows over 3 of 8 experts stream 3 expert matrices, not 40, not 8."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 32)).astype(np.float32)
    w = rng.standard_normal((8, 16, 32)).astype(np.float32)
    ids = rng.choice([1, 4, 6], 40).astype(np.int32)
    y = np.zeros((40, 16), np.float32)
    before = _core.cpu_moe_expert_matmuls()
    run(dev, "moe_matmul_f32", args("MoeMatmulArgs", rows=40, n=16, k=32, num_experts=8, x_row_div=1), [x, w, ids, y])
    assert _core.cpu_moe_expert_matmuls() - before == 3
    np.testing.assert_allclose(y, np.einsum("rk,rnk->rn", x, w[ids]), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("tokens,k,dim", [(1, 1, 1), (5, 2, 33), (17, 8, 576)])
def test_moe_combine(dev, tokens, k, dim):
    rng = np.random.default_rng(tokens + dim)
    y = rng.standard_normal((tokens * k, dim)).astype(np.float32)
    w = rng.random((tokens, k)).astype(np.float32)
    out = Guarded((tokens, dim))
    run(dev, "moe_combine", args("MoeCombineArgs", num_tokens=tokens, top_k=k, dim=dim), [y, w, out.array])
    ref = np.einsum("tk,tkd->td", w.astype(np.float64), y.reshape(tokens, k, dim).astype(np.float64))
    np.testing.assert_allclose(out.array, ref, rtol=1e-5, atol=1e-6)
    out.check_guards()
