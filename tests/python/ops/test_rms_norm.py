import numpy as np
import pytest

from op_testing import DTYPES, Guarded, args, from_storage, run, to_storage


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,dim", [(1, 1), (1, 64), (3, 7), (5, 576), (17, 130)])
@pytest.mark.parametrize("add_residual", [False, True])
def test_rms_norm(dev, dtype, rows, dim, add_residual):
    rng = np.random.default_rng(rows * 100 + dim)
    x = rng.standard_normal((rows, dim)).astype(np.float32)
    res0 = rng.standard_normal((rows, dim)).astype(np.float32)
    w = to_storage(1 + 0.1 * rng.standard_normal(dim), dtype)
    residual = res0.copy() if add_residual else None
    out = Guarded((rows, dim))
    a = args("RmsNormArgs", rows=rows, dim=dim, eps=1e-5, add_residual=int(add_residual))
    run(dev, f"rms_norm_{dtype}", a, [x, residual, w, out.array])
    src = (x.astype(np.float64) + res0) if add_residual else x.astype(np.float64)
    ref = src / np.sqrt((src**2).mean(-1, keepdims=True) + 1e-5) * from_storage(w, dtype)
    np.testing.assert_allclose(out.array, ref, atol=2e-5, rtol=2e-5)
    if add_residual:
        np.testing.assert_allclose(residual, src, atol=1e-6)
    out.check_guards()


def test_rms_norm_in_place(dev):
    rng = np.random.default_rng(0)
    h = rng.standard_normal((4, 33)).astype(np.float32)
    residual = rng.standard_normal((4, 33)).astype(np.float32)
    w = np.ones(33, np.float32)
    src = h.astype(np.float64) + residual
    run(dev, "rms_norm_f32", args("RmsNormArgs", rows=4, dim=33, eps=1e-6, add_residual=1), [h, residual, w, h])
    np.testing.assert_allclose(h, src / np.sqrt((src**2).mean(-1, keepdims=True) + 1e-6), atol=2e-5)
