import numpy as np
import pytest

from op_testing import Guarded, args, run


@pytest.mark.parametrize("rows,cols,cap", [(1, 1, 30.0), (3, 211, 4.0), (2, 49152, 30.0)])
def test_softcap(dev, rows, cols, cap):
    """Gemma 2's final logits: cap * tanh(x / cap), in place or into another array."""
    rng = np.random.default_rng(cols)
    x = (3 * cap * rng.standard_normal((rows, cols))).astype(np.float32)
    out = Guarded((rows, cols))
    run(dev, "softcap", args("SoftcapArgs", rows=rows, cols=cols, cap=cap), [x, out.array])
    ref = cap * np.tanh(x.astype(np.float64) / cap)
    np.testing.assert_allclose(out.array, ref, rtol=1e-6, atol=1e-6 * cap)
    out.check_guards()
    run(dev, "softcap", args("SoftcapArgs", rows=rows, cols=cols, cap=cap), [x, x])  # in place
    np.testing.assert_allclose(x, ref, rtol=1e-6, atol=1e-6 * cap)
