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


def gelu_tanh(g):
    return 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))


@pytest.mark.parametrize("rows,dim,fused", [(1, 1, False), (3, 7, False), (9, 1536, False), (4, 37, True)])
def test_gelu_tanh_mul(dev, rows, dim, fused):
    """GeGLU (Gemma): gelu with the tanh approximation, as transformers' gelu_pytorch_tanh."""
    rng = np.random.default_rng(dim + 7)
    gu = rng.standard_normal((rows, 2 * dim)).astype(np.float32)
    gu[:, :dim] *= 4
    g, u = (gu, gu.ravel()[dim:]) if fused else (np.ascontiguousarray(gu[:, :dim]), np.ascontiguousarray(gu[:, dim:]))
    out = Guarded((rows, dim))
    run(dev, "gelu_tanh_mul", args("SiluMulArgs", rows=rows, dim=dim, in_stride=2 * dim if fused else dim),
        [g, u, out.array])
    g64, u64 = gu[:, :dim].astype(np.float64), gu[:, dim:].astype(np.float64)
    np.testing.assert_allclose(out.array, gelu_tanh(g64) * u64, atol=2e-6, rtol=2e-5)
    out.check_guards()


def test_gelu_tanh_mul_whole_range(dev):
    g = np.linspace(-100, 100, 20001).astype(np.float32)[None, :]
    out = Guarded(g.shape)
    run(dev, "gelu_tanh_mul", args("SiluMulArgs", rows=1, dim=g.shape[1], in_stride=g.shape[1]),
        [g, np.ones_like(g), out.array])
    np.testing.assert_allclose(out.array, gelu_tanh(g.astype(np.float64)), rtol=2e-5, atol=1e-6)
    out.check_guards()
