import numpy as np
import pytest

from op_testing import DTYPES, Guarded, args, from_storage, run, to_storage


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,heads,kv_heads,hd", [(1, 1, 1, 2), (5, 4, 2, 24), (7, 9, 3, 64), (3, 2, 1, 256)])
def test_qk_norm_in_fused_qkv_rows(dev, dtype, tokens, heads, kv_heads, hd):
    """Each head of q and k RMS-normed by its own rms, in place inside the fused q | k | v rows; v untouched."""
    rng = np.random.default_rng(tokens * 31 + hd)
    stride = (heads + 2 * kv_heads) * hd
    qkv0 = rng.standard_normal((tokens, stride)).astype(np.float32) * 3
    qw, kw = (to_storage(1 + 0.1 * rng.standard_normal(hd), dtype) for _ in range(2))
    qkv = Guarded(qkv0.shape, fill=qkv0)
    a = args("QKNormArgs", num_tokens=tokens, num_heads=heads, num_kv_heads=kv_heads, head_dim=hd, q_stride=stride,
             k_stride=stride, eps=1e-6)
    run(dev, f"qk_norm_{dtype}", a, [qkv.array, qkv.array.ravel()[heads * hd:], qw, kw])

    def ref(x, w):
        x = x.astype(np.float64)
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * from_storage(w, dtype)

    x = qkv0.reshape(tokens, heads + 2 * kv_heads, hd)
    want = np.concatenate([ref(x[:, :heads], qw), ref(x[:, heads:heads + kv_heads], kw), x[:, heads + kv_heads:]], 1)
    np.testing.assert_allclose(qkv.array, want.reshape(tokens, stride), rtol=2e-5, atol=2e-5)
    qkv.check_guards()
