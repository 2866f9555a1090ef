import numpy as np
import pytest

from op_testing import Guarded, args, run


def rope_ref(x, positions, inv_freq, scaling=1.0):
    """HF rotate_half convention over the first 2 * len(inv_freq) dims (the rest pass through), float64."""
    rot = 2 * len(inv_freq)
    half = rot // 2
    ang = positions[:, None, None].astype(np.float64) * inv_freq[None, None, :]
    cos, sin = np.cos(ang) * scaling, np.sin(ang) * scaling
    x1, x2 = x[..., :half], x[..., half:rot]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rot:]], axis=-1)


# (tokens, heads, kv_heads, head_dim, rotary_dim, scaling): partial rotary (Phi-3 / Phi-4-mini, 0.75 and 0.5) and
# a cos/sin scaling (yarn, longrope)
ROPE_CASES = [(1, 1, 1, 2, 2, 1.0), (5, 4, 2, 16, 16, 1.0), (7, 9, 3, 64, 64, 1.0), (3, 2, 1, 128, 128, 1.0),
              (4, 3, 1, 96, 72, 1.0), (6, 2, 2, 64, 32, 1.19), (2, 4, 2, 10, 6, 0.9)]


@pytest.mark.parametrize("tokens,heads,kv_heads,hd,rot,scaling", ROPE_CASES)
def test_rope(dev, tokens, heads, kv_heads, hd, rot, scaling):
    rng = np.random.default_rng(tokens * hd)
    pos = rng.integers(0, 5000, tokens).astype(np.int32)
    inv_freq = (1.0 / 10000 ** (np.arange(0, rot, 2) / rot)).astype(np.float32)
    q0 = rng.standard_normal((tokens, heads, hd)).astype(np.float32)
    k0 = rng.standard_normal((tokens, kv_heads, hd)).astype(np.float32)
    q = Guarded((tokens, heads * hd), fill=q0.reshape(tokens, -1))
    k = Guarded((tokens, kv_heads * hd), fill=k0.reshape(tokens, -1))
    a = args("RopeArgs", num_tokens=tokens, num_heads=heads, num_kv_heads=kv_heads, head_dim=hd, rotary_dim=rot,
             q_stride=heads * hd, k_stride=kv_heads * hd, scaling=scaling)
    run(dev, "rope", a, [pos, inv_freq, q.array, k.array])
    # angles up to 5000 rad in fp32: allow the argument's own rounding (5000 * 2^-24 ~ 3e-4)
    f = inv_freq.astype(np.float64)
    np.testing.assert_allclose(q.array.reshape(q0.shape), rope_ref(q0, pos, f, scaling), atol=2e-3)
    np.testing.assert_allclose(k.array.reshape(k0.shape), rope_ref(k0, pos, f, scaling), atol=2e-3)
    q.check_guards()
    k.check_guards()
