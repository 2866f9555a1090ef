import numpy as np
import pytest

from op_testing import Guarded, args, run


@pytest.mark.parametrize("rows,dim", [(1, 1), (3, 7), (9, 1536)])
def test_silu_mul(dev, rows, dim):
    rng = np.random.default_rng(dim)
    g = (4 * rng.standard_normal((rows, dim))).astype(np.float32)
    u = rng.standard_normal((rows, dim)).astype(np.float32)
    out = Guarded((rows, dim))
    run(dev, "silu_mul", args("SiluMulArgs", rows=rows, dim=dim, in_stride=dim), [g, u, out.array])
    g64 = g.astype(np.float64)
    np.testing.assert_allclose(out.array, g64 / (1 + np.exp(-g64)) * u, atol=1e-6, rtol=1e-5)
    out.check_guards()


@pytest.mark.parametrize("rows,dim", [(1, 5), (3, 7), (4, 1536)])
def test_silu_mul_fused_gate_up(dev, rows, dim):
    """gate and up as the two halves of one [rows, 2 * dim] projection (the engine's fused gate_up)."""
    rng = np.random.default_rng(dim + 1)
    gu = rng.standard_normal((rows, 2 * dim)).astype(np.float32)
    gu[:, :dim] *= 4
    out = Guarded((rows, dim))
    run(dev, "silu_mul", args("SiluMulArgs", rows=rows, dim=dim, in_stride=2 * dim), [gu, gu.ravel()[dim:], out.array])
    g64, u64 = gu[:, :dim].astype(np.float64), gu[:, dim:].astype(np.float64)
    np.testing.assert_allclose(out.array, g64 / (1 + np.exp(-g64)) * u64, atol=1e-6, rtol=1e-5)
    out.check_guards()


def test_silu_mul_whole_range(dev):
    """Large negative and positive gates: no overflow, no NaN, silu(-100) ~ 0, silu(100) = 100."""
    g = np.linspace(-100, 100, 20001).astype(np.float32)[None, :]
    u = np.ones_like(g)
    out = Guarded(g.shape)
    run(dev, "silu_mul", args("SiluMulArgs", rows=1, dim=g.shape[1], in_stride=g.shape[1]), [g, u, out.array])
    g64 = g.astype(np.float64)
    np.testing.assert_allclose(out.array, g64 / (1 + np.exp(-g64)), rtol=1e-6, atol=1e-30)
    out.check_guards()
