import numpy as np
import pytest

from op_testing import Guarded, args, run


@pytest.mark.parametrize("rows,dim", [(1, 1), (3, 17), (8, 576)])
def test_gather_rows(dev, rows, dim):
    rng = np.random.default_rng(rows)
    src = rng.standard_normal((11, dim)).astype(np.float32)
    idx = rng.integers(0, 11, rows).astype(np.int32)
    out = Guarded((rows, dim))
    run(dev, "gather_rows", args("GatherRowsArgs", rows=rows, dim=dim), [src, idx, out.array])
    np.testing.assert_array_equal(out.array, src[idx])
    out.check_guards()
