"""moe_matmul groups rows by expert: each selected expert's weights are streamed once, the others not at all
(the op's results on every backend: test_backend_ops.py)."""

import numpy as np

from op_testing import _core, args, run


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
