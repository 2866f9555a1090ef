import numpy as np
import pytest

from op_testing import Guarded, args, run


def rope_ref(x, positions, inv_freq):
    """HF rotate_half convention, float64."""
    half = x.shape[-1] // 2
    ang = positions[:, None, None].astype(np.float64) * inv_freq[None, None, :]
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@pytest.mark.parametrize("tokens,heads,kv_heads,hd", [(1, 1, 1, 2), (5, 4, 2, 16), (7, 9, 3, 64), (3, 2, 1, 128)])
def test_rope(dev, tokens, heads, kv_heads, hd):
    rng = np.random.default_rng(tokens * hd)
    pos = rng.integers(0, 5000, tokens).astype(np.int32)
    inv_freq = (1.0 / 10000 ** (np.arange(0, hd, 2) / hd)).astype(np.float32)
    q0 = rng.standard_normal((tokens, heads, hd)).astype(np.float32)
    k0 = rng.standard_normal((tokens, kv_heads, hd)).astype(np.float32)
    q = Guarded((tokens, heads * hd), fill=q0.reshape(tokens, -1))
    k = Guarded((tokens, kv_heads * hd), fill=k0.reshape(tokens, -1))
    a = args("RopeArgs", num_tokens=tokens, num_heads=heads, num_kv_heads=kv_heads, head_dim=hd,
             q_stride=heads * hd, k_stride=kv_heads * hd)
    run(dev, "rope", a, [pos, inv_freq, q.array, k.array])
    # angles up to 5000 rad in fp32: allow the argument's own rounding (5000 * 2^-24 ~ 3e-4)
    np.testing.assert_allclose(q.array.reshape(q0.shape), rope_ref(q0, pos, inv_freq.astype(np.float64)), atol=2e-3)
    np.testing.assert_allclose(k.array.reshape(k0.shape), rope_ref(k0, pos, inv_freq.astype(np.float64)), atol=2e-3)
    q.check_guards()
    k.check_guards()
