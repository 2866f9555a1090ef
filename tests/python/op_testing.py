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
    if cls_name == "MatmulArgs" and "y_stride" not in fields:
        fields["y_stride"] = fields["n"]  # contiguous rows of y unless a case asks otherwise
    for k, v in fields.items():
        setattr(a, k, v)
    return a


# ---------------------------------------------------------------------------------------- quantized weights
QUANT_FORMATS = {q["name"]: q for q in _core.ops.quant_types()}  # name -> block_elems, block_bytes, ggml_type
# byte offsets of each format's f16 scale fields in its block (ggml-common.h); the rest of a block is codes
_SCALE_FIELDS = {"q8_0": (0,), "q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2),
                 "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,), "a8": (0, 2), "a6": (0, 2)}
GGUF_FORMATS = [f for f, q in QUANT_FORMATS.items() if q["ggml_type"] >= 0]  # the rest have no GGUF type


def random_quant_rows(fmt: str, rows: int, cols: int, rng, scale: float = 0.05) -> np.ndarray:
    """u8 [rows, row bytes]: random blocks of `fmt` (every code and packed sub-scale pattern), scale fields
    random f16 values of magnitude ~`scale` (Q4_1/Q5_1 mins and K-quant dmins of either sign)."""
    q = QUANT_FORMATS[fmt]
    nblocks = cols // q["block_elems"]
    assert nblocks * q["block_elems"] == cols, (fmt, cols)
    data = rng.integers(0, 256, (rows * nblocks, q["block_bytes"]), dtype=np.uint8)
    for off in _SCALE_FIELDS[fmt]:
        # the K-quants' 6-bit sub-scales reach 63 and Q6_K's i8 scales 127: smaller super-block scales keep
        # weights ~N(0, scale)-sized
        s = scale / (32 if fmt.endswith("_k") else 1)
        vals = (s * (0.5 + rng.random(rows * nblocks)) * rng.choice([-1, 1], rows * nblocks)).astype(np.float16)
        data[:, off:off + 2] = vals.view(np.uint8).reshape(-1, 2)
    return data.reshape(rows, nblocks * q["block_bytes"])


def gguf_dequantize(fmt: str, rows: np.ndarray, cols: int) -> np.ndarray:
    """float64 [rows, cols] by gguf-py (llama.cpp's reference dequantization), not by our code; A8 and A6 (no
    GGUF type) by their definitions in numpy (include/metal_engine/quant.h)."""
    import gguf

    if fmt == "a8":
        b = rows.reshape(rows.shape[0], cols // 32, 36)
        d = b[..., 0:2].copy().view(np.float16).astype(np.float64)
        m = b[..., 2:4].copy().view(np.float16).astype(np.float64)
        return (d * b[..., 4:].astype(np.float64) + m).reshape(rows.shape[0], cols)
    if fmt == "a6":  # {f16 d, f16 m, u8 ql[16], u8 qh[8]}: weight i's low 4 bits in ql, its top 2 in qh (quant.h)
        b = rows.reshape(rows.shape[0], cols // 32, 28)
        d = b[..., 0:2].copy().view(np.float16).astype(np.float64)
        m = b[..., 2:4].copy().view(np.float16).astype(np.float64)
        i = np.arange(32)
        low = np.where(i < 16, b[..., 4 + i % 16] & 0xF, b[..., 4 + i % 16] >> 4)
        top = (b[..., 20 + i % 8] >> (2 * (i // 8))) & 3
        return (d * (low | (top << 4)).astype(np.float64) + m).reshape(rows.shape[0], cols)

    t = gguf.GGMLQuantizationType(QUANT_FORMATS[fmt]["ggml_type"])
    return gguf.quants.dequantize(rows, t).astype(np.float64).reshape(rows.shape[0], cols)
