"""Every op case of cases.py (each defined once), in the manner of llama.cpp's test-backend-ops:
  - on the cpu backend, with 1 and 2 threads, against its float64 numpy reference;
  - on every other backend the build has against the cpu op: metal-sim's kernel emulator with threads run
    first-to-last and last-to-first (a missing barrier shows), and through the Metal backend (metal-cpp, one
    command buffer; on a Mac the real GPU).
Outputs start NaN-filled (in-out buffers with their inputs) inside guard bands, views alias their base
buffer as the engine binds them."""

import numpy as np
import pytest

from cases import CASES
from op_testing import GUARD, _core, device, run

METAL = next((b for b in ("metal", "metal-sim") if b in _core.available_backends()), None)
EMULATOR = hasattr(_core, "metal_sim")
BACKENDS = (["emulator", "emulator-reverse"] if EMULATOR else []) + ([METAL] if METAL else [])


class Buffers:
    """A case's buffers laid out for one run: outputs in guard-banded arrays, views into their base."""

    def __init__(self, case):
        self.case, self.arrays, self.raw = case, [], {}
        for i, b in enumerate(case.buffers):
            if b is None or i in case.views:
                self.arrays.append(None)
            elif i in case.outputs:
                init = case.outputs[i]
                raw = np.empty(b.size + 2 * GUARD, b.dtype)
                raw.view(np.uint8)[:] = 0xAB
                arr = raw[GUARD:GUARD + b.size].reshape(b.shape)
                if init is not None:
                    arr[...] = init
                elif np.issubdtype(b.dtype, np.floating):
                    arr[...] = np.nan
                else:
                    arr[...] = -1234567
                self.raw[i] = (raw, raw.copy())
                self.arrays.append(arr)
            else:
                self.arrays.append(b)
        for i, (base, offset) in case.views.items():
            self.arrays[i] = self.arrays[base].reshape(-1)[offset:]

    def check_guards(self):
        for i, (raw, before) in self.raw.items():
            g = GUARD * raw.itemsize
            assert np.array_equal(raw.view(np.uint8)[:g], before.view(np.uint8)[:g]), f"buffer {i}: wrote before it"
            assert np.array_equal(raw.view(np.uint8)[-g:], before.view(np.uint8)[-g:]), f"buffer {i}: wrote past it"

    def outputs(self):
        return {i: self.arrays[i] for i in self.case.outputs}


def run_on(backend, case):
    bufs = Buffers(case)
    if backend in ("emulator", "emulator-reverse"):
        _core.metal_sim.run(case.kernel, case.args, bufs.arrays, backend == "emulator-reverse")
    else:
        run(device(backend, 2), case.kernel, case.args, bufs.arrays)
    bufs.check_guards()
    return bufs.outputs()


def as_float(x):
    from op_testing import from_storage

    if x.dtype == np.uint16:  # bf16 bit patterns
        return from_storage(x, "bf16")
    return x.astype(np.float64)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cpu_against_float64(dev, case):
    if case.kernel not in dev.kernel_names():
        pytest.skip(f"this build's cpu backend has no {case.kernel} (matmul_blas: no BLAS)")
    bufs = Buffers(case)
    run(dev, case.kernel, case.args, bufs.arrays)
    bufs.check_guards()
    rtol, atol = case.tol
    for i, want in case.reference().items():
        got = bufs.outputs()[i]
        if case.nmse is not None:
            assert_nmse(as_float(got), want, case.nmse, f"buffer {i}")
        elif rtol == 0 and atol == 0:
            np.testing.assert_array_equal(as_float(got), np.asarray(want, np.float64), err_msg=f"buffer {i}")
        else:
            np.testing.assert_allclose(as_float(got), want, rtol=rtol, atol=atol, err_msg=f"buffer {i}")


def assert_nmse(got, want, limit, what):
    """sum((got - want)^2) / sum(want^2) <= limit (llama.cpp's test-backend-ops criterion), every value finite."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.isfinite(got).all(), f"{what}: not finite"
    err = float(((got - want) ** 2).sum() / max((want**2).sum(), 1e-30))
    assert err <= limit, f"{what}: NMSE {err:.3g} > {limit}"


# The kernels the Metal backend has (op_table's metal_kernels); matmul_blas is the cpu's BLAS route.
METAL_KERNELS = {k for o in _core.ops.op_table() for k in o["metal_kernels"]}
METAL_CASES = [c for c in CASES if c.kernel in METAL_KERNELS]


@pytest.mark.skipif(not BACKENDS, reason="this build has no backend but cpu")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", METAL_CASES, ids=lambda c: c.id)
def test_backend_against_cpu(case, backend):
    want = run_on("cpu", case)
    got = run_on(backend, case)
    rtol, atol = case.backend_tol
    for i in case.outputs:
        if case.nmse is not None:
            assert_nmse(as_float(got[i]), as_float(want[i]), case.nmse, f"buffer {i}")
        elif rtol == 0 and atol == 0:
            np.testing.assert_array_equal(got[i], want[i], err_msg=f"buffer {i}")
        else:
            np.testing.assert_allclose(as_float(got[i]), as_float(want[i]), rtol=rtol, atol=atol, err_msg=f"buffer {i}")


@pytest.mark.skipif(not EMULATOR, reason="the emulator's registry")
def test_the_cases_run_every_msl_function_of_the_cpu_ops():
    """Each MSL function behind the cpu backend's ops (f32 activations) is run by some case on the emulator:
    matmul_<wdt> as matmul_gemv_<wdt> (up to 4 rows) and matmul_gemm_<wdt> (more), gated for silu_mul and
    gelu_tanh_mul (one template, two host names), every other kernel under its own name."""
    ran = set()
    for c in METAL_CASES:
        if c.kernel.startswith("matmul_"):
            ran.add(f"{_core.ops.metal_matmul_kernel_prefix(c.args)}_{c.kernel[len('matmul_'):]}")
        else:
            ran.add(c.kernel)
    ops = [o for o in _core.ops.op_table() if not o["metal_only"]]
    want = set()
    for o in ops:
        for k in o["metal_kernels"]:
            if "_act_" in k:
                continue  # the 16-bit-activation flavours: tests/python/metal_sim/test_metal_kernels_16bit_activations.py
            if o["name"] == "matmul":
                want |= {k.replace("matmul_", "matmul_gemv_"), k.replace("matmul_", "matmul_gemm_")}
            else:
                want.add(k)
    assert want <= ran, sorted(want - ran)
    assert want <= set(_core.metal_sim.kernel_names())
