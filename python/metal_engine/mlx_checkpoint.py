"""MLX affine checkpoints (mlx-community's quantized models) -> the engine's blocks, once, into the cache.

An MLX quantized linear or embedding `<m>` is `<m>.weight` uint32 [out, in * bits / 32] (elements packed LSB
first), `<m>.scales` and `<m>.biases` [out, in / group_size], w = scales * q + biases, as config.json's
"quantization": {"group_size", "bits"} says (with per-module entries overriding it or turning it off).
4-bit groups of 32, 64 or 128 are exactly Q4_1 blocks of 32 (d = scale, m = bias, the nibbles reordered to
Q4_1's "byte i holds weights i and i + 16"), 8-bit ones exactly A8 blocks ({f16 d, f16 m, u8 q[32]},
include/metal_engine/quant.h), so they are repacked at load and run by those kernels, with scales and
biases in f16 (an MLX file's bf16 scales convert exactly within f16's range; a value outside it is an error
naming the tensor). Other widths (2, 3, 5, 6) are refused, naming what the engine runs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from metal_engine.quantization import _as_f32, _read_safetensors, _shards, _write_safetensors

GROUP_SIZES = (32, 64, 128)


def mlx_quantization(config: dict):
    """config.json's MLX quantization entry, or None for a checkpoint that has none."""
    q = config.get("quantization")
    if isinstance(q, dict) and "bits" in q and "group_size" in q:
        return q
    return None


def _module_params(q: dict, module: str, where: str):
    """(bits, group_size) of `module`, or None when the config turns its quantization off."""
    o = q.get(module, {})
    if o is False:
        return None
    bits = int(o.get("bits", q["bits"])) if isinstance(o, dict) else int(q["bits"])
    group = int(o.get("group_size", q["group_size"])) if isinstance(o, dict) else int(q["group_size"])
    mode = (o.get("mode") if isinstance(o, dict) else None) or q.get("mode", "affine")
    if mode != "affine":
        raise ValueError(f"{where}: {module} is quantized in MLX mode {mode!r}; metal_engine runs mode 'affine'")
    if bits not in (4, 8):
        raise ValueError(f"{where}: {module} is MLX {bits}-bit; metal_engine runs MLX 4- and 8-bit checkpoints "
                         "(as Q4_1 and A8 blocks) so far")
    if group not in GROUP_SIZES:
        raise ValueError(f"{where}: {module} has MLX group_size {group}; metal_engine takes 32, 64 or 128")
    return bits, group


def repack_q4_1(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, group: int, name: str) -> np.ndarray:
    """uint32 [out, in / 8] + f32 scales, biases [out, in / group] -> Q4_1 blocks u8 [out, in / 32 * 20]."""
    out_dim = packed.shape[0]
    cols = packed.shape[1] * 8
    if scales.shape != (out_dim, cols // group) or biases.shape != scales.shape or cols % group:
        raise ValueError(f"{name}: scales / biases {list(scales.shape)} do not fit {cols} weights per row in "
                         f"groups of {group}")
    shifts = np.arange(8, dtype=np.uint32) * 4
    codes = ((packed[:, :, None] >> shifts) & 0xF).astype(np.uint8).reshape(out_dim, cols // 32, 32)
    rep = group // 32  # Q4_1 blocks per MLX group
    d = np.repeat(scales, rep, axis=1)
    m = np.repeat(biases, rep, axis=1)
    for what, v in (("scales", d), ("biases", m)):
        if not np.isfinite(v.astype(np.float16)).all() and np.isfinite(v).all():
            raise ValueError(f"{name}: its {what} leave float16's range; metal_engine keeps them as Q4_1's f16")
    blocks = np.empty((out_dim, cols // 32, 20), np.uint8)
    blocks[..., 0:2] = d.astype(np.float16).view(np.uint8).reshape(out_dim, cols // 32, 2)
    blocks[..., 2:4] = m.astype(np.float16).view(np.uint8).reshape(out_dim, cols // 32, 2)
    blocks[..., 4:] = codes[..., :16] | (codes[..., 16:] << 4)
    return blocks.reshape(out_dim, -1)


def repack_a8(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, group: int, name: str) -> np.ndarray:
    """uint32 [out, in / 4] (bytes in element order) + scales, biases [out, in / group] -> A8 blocks
    u8 [out, in / 32 * 36]: {f16 d, f16 m, u8 q[32]}."""
    out_dim = packed.shape[0]
    cols = packed.shape[1] * 4
    if scales.shape != (out_dim, cols // group) or biases.shape != scales.shape or cols % group:
        raise ValueError(f"{name}: scales / biases {list(scales.shape)} do not fit {cols} weights per row in "
                         f"groups of {group}")
    codes = np.ascontiguousarray(packed).view(np.uint8).reshape(out_dim, cols // 32, 32)  # little-endian words
    d, m = (np.repeat(v, group // 32, axis=1) for v in (scales, biases))
    blocks = np.empty((out_dim, cols // 32, 36), np.uint8)
    blocks[..., 0:2] = d.astype(np.float16).view(np.uint8).reshape(out_dim, cols // 32, 2)
    blocks[..., 2:4] = m.astype(np.float16).view(np.uint8).reshape(out_dim, cols // 32, 2)
    blocks[..., 4:] = codes
    return blocks.reshape(out_dim, -1)


def mlx_converted_checkpoint(src, progress: bool = True) -> Path:
    """The MLX checkpoint `src` with its 4-bit modules as Q4_1 blocks, made once into the cache."""
    from metal_engine.gguf_checkpoint import build_in_cache, cache_dir

    src = Path(src)
    cfg_text = (src / "config.json").read_text()
    cfg = json.loads(cfg_text)
    q = mlx_quantization(cfg)
    shards = _shards(src)
    key = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in shards) + "|" + cfg_text + "|v1"
    target = cache_dir() / f"{src.name}-mlx-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    tensors = {}
    for p in shards:
        tensors.update(_read_safetensors(p)[1])
    out, metadata = {}, {"format": "pt", "source": src.name, "quantization": "mlx affine as q4_1 / a8"}
    modules = [n[: -len(".scales")] for n in tensors if n.endswith(".scales")]
    for mod in modules:
        if mod + ".weight" not in tensors or mod + ".biases" not in tensors:
            raise ValueError(f"{src}: {mod} has scales but no weight or biases; not an MLX affine checkpoint")
    from tqdm import tqdm

    done = set()
    for mod in tqdm(modules, desc=f"repacking {src.name}", unit="module", disable=not progress):
        params = _module_params(q, mod, str(src / "config.json"))
        if params is None:
            raise ValueError(f"{src}: config.json turns {mod}'s quantization off but it has scales")
        bits, group = params
        wd, ws, wb = (tensors[mod + s] for s in (".weight", ".scales", ".biases"))
        if wd[0] != "U32":
            raise ValueError(f"{src}: {mod}.weight is {wd[0]}, not MLX's packed U32")
        packed = np.frombuffer(wd[2], dtype=np.uint32).reshape(wd[1])
        repack, fmt = (repack_q4_1, "q4_1") if bits == 4 else (repack_a8, "a8")
        blocks = repack(packed, _as_f32(*ws), _as_f32(*wb), group, mod)
        out[mod + ".weight"] = ("U8", list(blocks.shape), np.ascontiguousarray(blocks))
        metadata[f"quant.{mod}.weight"] = fmt
        done |= {mod + ".weight", mod + ".scales", mod + ".biases"}
    for name, t in tensors.items():
        if name not in done:
            out[name] = t

    def make(tmp: Path):
        _write_safetensors(tmp / "model.safetensors", out, metadata)
        for f in src.iterdir():
            if (f.suffix == ".json" and f.name not in ("model.safetensors.index.json", "config.json")) or \
                    f.name == "tokenizer.model":
                shutil.copy2(f, tmp / f.name)
        cfg.pop("quantization", None)
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))

    return build_in_cache(target, make)
