import numpy as np
import pytest

from op_testing import Guarded, args, run


@pytest.mark.parametrize("rows,vocab", [(1, 1), (3, 7), (5, 49152), (2, 1000)])
def test_argmax(dev, rows, vocab):
    rng = np.random.default_rng(vocab)
    x = rng.standard_normal((rows, vocab)).astype(np.float32)
    if vocab > 10:
        x[0, 3] = x[0, vocab - 2] = x[0].max() + 1  # a tie: the first index wins, as numpy's
    out = Guarded((rows,), dtype=np.int32)
    run(dev, "argmax", args("ArgmaxArgs", rows=rows, vocab=vocab), [x, out.array])
    np.testing.assert_array_equal(out.array, x.argmax(-1))
    out.check_guards()
