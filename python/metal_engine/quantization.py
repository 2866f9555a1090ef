"""Load-time quantization of float checkpoints (vLLM's `quantization=` knob): `LLM(model, quantization="q4_k")`.

The checkpoint's matrices (linear layers and the token embedding; not norms, biases or an MoE router) are
quantized once into a GGUF block format the engine runs natively (include/metal_engine/quant.h) and written,
with every other tensor byte for byte, to a cached copy beside the converted GGUF checkpoints
(`METAL_ENGINE_CACHE`); later loads reuse it. Q8_0, Q4_0 and Q5_0 blocks are made by gguf-py's quantizers
(llama.cpp's reference ones); Q4_K by `quantize_q4_k` here (gguf-py has none). Rows that are not a whole
number of a format's blocks fall back as llama.cpp's quantize does: Q4_K to Q5_0, and a row of a length
no format divides stays float.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np

FORMATS = ("q8_0", "q4_0", "q4_k")
_FALLBACK = {"q4_k": "q5_0"}  # rows not a multiple of 256
_BLOCK = {"q8_0": 32, "q4_0": 32, "q5_0": 32, "q4_k": 256}
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def check_format(quantization: str) -> str:
    q = quantization.lower()
    if q not in FORMATS:
        raise ValueError(f"quantization={quantization!r}: metal_engine quantizes float checkpoints at load to "
                         f"{', '.join(FORMATS)} (GGUF files and quantized checkpoints keep their own formats)")
    return q


# --------------------------------------------------------------------------------- safetensors, raw bytes
def _read_safetensors(path: Path):
    """(metadata, {name: (dtype, shape, memoryview of its bytes)}) without converting anything."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    meta = header.pop("__metadata__", {}) or {}
    tensors = {}
    for name, e in header.items():
        b, en = e["data_offsets"]
        tensors[name] = (e["dtype"], list(e["shape"]), data[b:en])
    return meta, tensors


def _write_safetensors(path: Path, tensors: dict, metadata: dict):
    """tensors: name -> (dtype string, shape, bytes-like)."""
    header, offset = {}, 0
    for name, (dtype, shape, buf) in tensors.items():
        nbytes = len(memoryview(buf).cast("B"))
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, (_, _, buf) in tensors.items():
            f.write(memoryview(buf).cast("B"))


def _as_f32(dtype: str, shape, buf) -> np.ndarray:
    a = np.frombuffer(buf, dtype=_ST_DTYPES[dtype]).reshape(shape)
    if dtype == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


# ------------------------------------------------------------------------------------------- quantizers
def _f16(x):
    return np.asarray(x, np.float32).astype(np.float16)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """f32 [rows, cols] (cols a multiple of 256) -> Q4_K blocks u8 [rows, cols / 256 * 144]: per 32-weight
    sub-block w ~ d * sc * q - dmin * m, sc and m 6-bit, q 4-bit; sc, m from the sub-block's range (min clamped
    to 0, as llama.cpp), d, dmin from the super-block's largest. A first-order version of llama.cpp's
    make_qkx2_quants (which refines each sub-block's scale by a search)."""
    rows, cols = x.shape
    assert cols % 256 == 0
    v = x.reshape(-1, 8, 32).astype(np.float32)                  # [blocks, sub-block, weight]
    lo = np.minimum(v.min(-1), 0.0)
    hi = v.max(-1)
    scale = (hi - lo) / 15.0                                     # [blocks, 8]
    mins = -lo
    d = _f16(scale.max(-1) / 63.0).astype(np.float32)             # [blocks]
    dmin = _f16(mins.max(-1) / 63.0).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[:, None] > 0, np.rint(scale / d[:, None]), 0).clip(0, 63).astype(np.uint8)
        mq = np.where(dmin[:, None] > 0, np.rint(mins / dmin[:, None]), 0).clip(0, 63).astype(np.uint8)
        eff_scale = d[:, None] * sc
        eff_min = dmin[:, None] * mq
        q = np.where(eff_scale[..., None] > 0, np.rint((v + eff_min[..., None]) / eff_scale[..., None]), 0)
    q = q.clip(0, 15).astype(np.uint8)                            # [blocks, 8, 32]
    nb = v.shape[0]
    out = np.zeros((nb, 144), np.uint8)
    out[:, 0:2] = _f16(d).view(np.uint8).reshape(nb, 2)
    out[:, 2:4] = _f16(dmin).view(np.uint8).reshape(nb, 2)
    s = np.zeros((nb, 12), np.uint8)  # the inverse of ggml's get_scale_min_k4
    s[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    s[:, 4:8] = mq[:, 0:4] | ((mq[:, 4:8] >> 4) << 6)
    s[:, 8:12] = (sc[:, 4:8] & 0xF) | ((mq[:, 4:8] & 0xF) << 4)
    out[:, 4:16] = s
    for p in range(4):  # bytes 32p..32p+31: sub-block 2p in the low nibbles, 2p + 1 in the high
        out[:, 16 + 32 * p:16 + 32 * (p + 1)] = q[:, 2 * p] | (q[:, 2 * p + 1] << 4)
    return out.reshape(rows, -1)


def quantize(x: np.ndarray, fmt: str) -> np.ndarray:
    """f32 [rows, cols] -> u8 [rows, row bytes] of `fmt` blocks."""
    if fmt == "q4_k":
        return quantize_q4_k(x)
    import gguf

    return gguf.quants.quantize(np.ascontiguousarray(x, np.float32), gguf.GGMLQuantizationType[fmt.upper()])


def _format_for(name: str, shape, fmt: str):
    """The format a tensor is quantized to, or None (kept as is)."""
    if len(shape) != 2 or not name.endswith(".weight") or "norm" in name:
        return None
    if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):  # MoE routers decide by small margins
        return None
    for f in (fmt, _FALLBACK.get(fmt)):
        if f and shape[1] % _BLOCK[f] == 0:
            return f
    return None


# ----------------------------------------------------------------------------------------------- cache
def _shards(src: Path) -> list:
    index = src / "model.safetensors.index.json"
    if index.exists():
        return sorted({src / f for f in json.loads(index.read_text())["weight_map"].values()})
    if (src / "model.safetensors").exists():
        return [src / "model.safetensors"]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {str(src)!r}")


def quantized_checkpoint(src, fmt: str, progress: bool = True) -> Path:
    """The checkpoint `src` with its matrices quantized to `fmt`, made once into the cache."""
    from metal_engine.gguf_checkpoint import build_in_cache, cache_dir

    fmt = check_format(fmt)
    src = Path(src)
    shards = _shards(src)
    key_src = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in shards)
    key_src += f"|{(src / 'config.json').read_text()}|{fmt}|v1"
    target = cache_dir() / f"{src.name}-{fmt}-{hashlib.sha256(key_src.encode()).hexdigest()[:16]}"
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    for p in shards:
        if any(k.startswith("quant.") for k in _read_safetensors(p)[0]):
            raise ValueError(f"{src} is already quantized; quantization= applies to float checkpoints")

    def make(tmp: Path):
        from tqdm import tqdm

        out, metadata = {}, {"format": "pt", "source": src.name, "quantization": fmt}
        tensors = {}
        for p in shards:
            tensors.update(_read_safetensors(p)[1])
        for name, (dtype, shape, buf) in tqdm(tensors.items(), desc=f"quantizing {src.name} to {fmt}",
                                              unit="tensor", disable=not progress):
            f = _format_for(name, shape, fmt) if dtype in ("F32", "F16", "BF16") else None
            if f is None:
                out[name] = (dtype, shape, buf)
                continue
            blocks = quantize(_as_f32(dtype, shape, buf), f)
            out[name] = ("U8", list(blocks.shape), np.ascontiguousarray(blocks))
            metadata[f"quant.{name}"] = f
        _write_safetensors(tmp / "model.safetensors", out, metadata)
        for f in os.listdir(src):
            if (f.endswith(".json") and f != "model.safetensors.index.json") or f == "tokenizer.model":
                shutil.copy2(src / f, tmp / f)

    return build_in_cache(target, make)
