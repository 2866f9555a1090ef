import numpy as np
import pytest

from op_testing import DTYPES, Guarded, args, from_storage, run, to_storage

SHAPES = [  # (m, n, k): decode rows (GEMV path, 1-3 rows), odd sizes, tiles and their remainders
    (1, 1, 1), (1, 17, 7), (1, 64, 64), (2, 33, 513), (3, 100, 300), (4, 31, 129),
    (5, 16, 16), (6, 47, 77), (7, 130, 200), (13, 1, 9), (64, 96, 256), (65, 33, 520),
    # tiles: whole 8- and 6-row tiles and every remainder, W blocks of 2 and 3 rows and their remainders, enough
    # W rows per thread that the prefetch of later blocks runs, x in 32-row blocks and a remainder block
    (8, 50, 40), (12, 49, 24), (16, 100, 576), (17, 101, 33), (31, 65, 130), (32, 20, 9), (103, 70, 48),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kernel", ["matmul", "matmul_blas"])  # matmul_blas: prefill via the BLAS, as on macOS
def test_matmul(dev, kernel, dtype, m, n, k, bias):
    if kernel == "matmul_blas" and f"matmul_blas_{dtype}" not in dev.kernel_names():
        pytest.skip("this build has no BLAS")
    rng = np.random.default_rng(m * 1000 + n * 10 + k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = to_storage(rng.standard_normal((n, k)), dtype)
    b = to_storage(rng.standard_normal(n), dtype) if bias else None
    y = Guarded((m, n))
    run(dev, f"{kernel}_{dtype}", args("MatmulArgs", m=m, n=n, k=k, has_bias=int(bias)), [x, w, b, y.array])
    ref = x.astype(np.float64) @ from_storage(w, dtype).T
    if bias:
        ref += from_storage(b, dtype)
    np.testing.assert_allclose(y.array, ref, atol=1e-4 * np.sqrt(k) + 1e-5, rtol=1e-5)
    y.check_guards()
