"""Shared pieces of the op tests (in the manner of llama.cpp's test-backend-ops): dtype handling,
guard-banded outputs, and running one kernel on a device."""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np


def _load_core():
    """metal_engine._core, or the extension file named by METAL_ENGINE_TEST_CORE (tests/check_isa_paths.sh runs
    the op tests against builds for other instruction sets)."""
    path = os.environ.get("METAL_ENGINE_TEST_CORE")
    if not path:
        from metal_engine import _core

        return _core
    try:  # the BLAS library the extension links (as metal_engine/_blas.py does; importing metal_engine
        import ctypes  # would load the installed extension beside this one)

        import scipy_openblas32 as openblas

        ctypes.CDLL(os.path.join(openblas.get_lib_dir(), f"lib{openblas.get_library()}.so"), mode=ctypes.RTLD_GLOBAL)
    except (ImportError, OSError):
        pass
    spec = importlib.util.spec_from_file_location("_core", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["_core"] = module  # torn down with the interpreter like any imported extension
    spec.loader.exec_module(module)
    return module


_core = _load_core()

DTYPES = ("f32", "f16", "bf16")
GUARD = 64  # elements of guard band on each side of every output
SENTINEL = np.uint32(0x7FC0DEAD)  # a NaN payload no kernel produces


def to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """x (float) in the kernel's storage dtype; bf16 is carried as uint16 bit patterns."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "f32":
        return x.copy()
    if dtype == "f16":
        return x.astype(np.float16)
    if dtype == "bf16":
        u = x.view(np.uint32).astype(np.uint64)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16  # round to nearest even
        return u.astype(np.uint16)
    raise ValueError(dtype)


def from_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """The exact float64 values a storage array holds."""
    if dtype == "bf16":
        return (x.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return x.astype(np.float64)


class Guarded:
    """An output array with guard bands before and after it, to catch out-of-bounds writes."""

    def __init__(self, shape, dtype=np.float32, fill=None):
        n = int(np.prod(shape))
        itemsize = np.dtype(dtype).itemsize
        self.raw = np.empty((n + 2 * GUARD) * itemsize, dtype=np.uint8)
        self.raw.view(np.uint8)[:] = 0xAB
        self.array = self.raw[GUARD * itemsize : (GUARD + n) * itemsize].view(dtype).reshape(shape)
        self.array[...] = 0 if fill is None else fill
        self._guard_copy = self.raw.copy()
        self._itemsize = itemsize
        self._n = n

    def check_guards(self):
        g = GUARD * self._itemsize
        before_ok = np.array_equal(self.raw[:g], self._guard_copy[:g])
        after_ok = np.array_equal(self.raw[-g:], self._guard_copy[-g:])
        assert before_ok, "kernel wrote before the start of its output"
        assert after_ok, "kernel wrote past the end of its output"


_devices = {}


def device(backend: str = "cpu", num_threads: int = 2):
    key = (backend, num_threads)
    if key not in _devices:
        _devices[key] = _core.create_device(backend, num_threads)
    return _devices[key]


def run(dev, kernel: str, args, buffers):
    _core.ops.run(dev, kernel, args, buffers)


def args(cls_name: str, **fields):
    a = getattr(_core.ops, cls_name)()
    for k, v in fields.items():
        setattr(a, k, v)
    return a
