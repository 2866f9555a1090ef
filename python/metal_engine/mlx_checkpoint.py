"""MLX affine checkpoints (mlx-community's quantized models) -> the engine's blocks, once, into the cache.

An MLX quantized linear or embedding `<m>` is `<m>.weight` uint32 [out, in * bits / 32] (elements packed LSB
first: 2, 4 and 8 bits a whole number per word, 3, 5 and 6 as a continuous bit stream), `<m>.scales` and
`<m>.biases` [out, in / group_size], w = scales * q + biases, as config.json's "quantization":
{"group_size", "bits"} says (with per-module entries overriding it or turning it off). Groups of 32, 64 or 128
are repacked at load into blocks of 32 that hold the same values exactly, scale and bias per block:
  8-bit -> A8 ({f16 d, f16 m, u8 q[32]}, include/metal_engine/quant.h), 9 bits a weight;
  6-bit -> A6 ({f16 d, f16 m, u8 ql[16], u8 qh[8]}), 7 bits a weight;
  5-bit -> Q5_1, 6 bits a weight;
  4-bit -> Q4_1 (the nibbles reordered to "byte i holds weights i and i + 16"), 5 bits a weight;
  3- and 2-bit -> Q4_1 too (their codes fit a nibble; 5 bits a weight where MLX's files take 3.5 and 2.5).
Scales and biases become f16 (an MLX file's bf16 scales convert exactly within f16's normal range, magnitudes
from 6e-5 to 65504; smaller ones round to f16's subnormals, below 6e-8 to zero; a value past the range is an
error naming the tensor).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from metal_engine.quantization import _as_f32, _read_safetensors, _shards, _write_safetensors

GROUP_SIZES = (32, 64, 128)
BITS = (2, 3, 4, 5, 6, 8)
FORMAT_OF_BITS = {2: "q4_1", 3: "q4_1", 4: "q4_1", 5: "q5_1", 6: "a6", 8: "a8"}


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
    if bits not in BITS:
        raise ValueError(f"{where}: {module} is MLX {bits}-bit; metal_engine runs MLX 2-, 3-, 4-, 5-, 6- and 8-bit "
                         "checkpoints")
    if group not in GROUP_SIZES:
        raise ValueError(f"{where}: {module} has MLX group_size {group}; metal_engine takes 32, 64 or 128")
    return bits, group


def mlx_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint32 [out, in * bits / 32] -> the codes u8 [out, in]: element i at bits [i * bits, (i + 1) * bits) of
    the row's little-endian bit stream (for 2, 4, 8 bits that is also "LSB first within each word")."""
    out_dim = packed.shape[0]
    raw = np.ascontiguousarray(packed).view(np.uint8).reshape(out_dim, -1)
    per = 8 // np.gcd(8, bits)        # elements per whole number of bytes: 4 (6-bit), 8 (3-, 5-bit), 8 / bits
    nbytes = per * bits // 8
    units = raw.reshape(out_dim, -1, nbytes).astype(np.uint64)
    word = np.zeros(units.shape[:2], np.uint64)
    for j in range(nbytes):
        word |= units[..., j] << np.uint64(8 * j)
    shifts = (np.arange(per, dtype=np.uint64) * np.uint64(bits))
    return ((word[..., None] >> shifts) & np.uint64((1 << bits) - 1)).astype(np.uint8).reshape(out_dim, -1)


def repack(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, group: int, bits: int,
           name: str) -> tuple[np.ndarray, str]:
    """uint32 [out, in * bits / 32] + f32 scales, biases [out, in / group] -> (blocks u8 [out, in / 32 * block
    bytes], their format): FORMAT_OF_BITS[bits], the same values."""
    out_dim = packed.shape[0]
    cols = packed.shape[1] * 32 // bits
    if scales.shape != (out_dim, cols // group) or biases.shape != scales.shape or cols % group:
        raise ValueError(f"{name}: scales / biases {list(scales.shape)} do not fit {cols} weights per row in "
                         f"groups of {group}")
    c = mlx_codes(packed, bits).reshape(out_dim, cols // 32, 32)
    d, m = (np.repeat(v, group // 32, axis=1) for v in (scales, biases))
    fmt = FORMAT_OF_BITS[bits]
    for what, v in (("scales", d), ("biases", m)):
        if not np.isfinite(v.astype(np.float16)).all() and np.isfinite(v).all():
            raise ValueError(f"{name}: its {what} leave float16's range; metal_engine keeps them as {fmt}'s f16")
    nib = (c[..., :16] & 0xF) | ((c[..., 16:] & 0xF) << 4)  # byte i: weight i low, weight i + 16 high
    if fmt == "a8":
        body = [c]
    elif fmt == "a6":  # the top two bits of weight 8 t + l at bits 2t, 2t + 1 of qh[l]
        top = (c >> 4).reshape(out_dim, cols // 32, 4, 8)
        qh = top[..., 0, :] | (top[..., 1, :] << 2) | (top[..., 2, :] << 4) | (top[..., 3, :] << 6)
        body = [nib, qh]
    elif fmt == "q5_1":  # the fifth bit of weight i at bit i of a little-endian u32
        fifth = ((c >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
        body = [np.bitwise_or.reduce(fifth, axis=-1).astype("<u4")[..., None].view(np.uint8), nib]
    else:
        body = [nib]
    head = [v.astype(np.float16)[..., None].view(np.uint8) for v in (d, m)]
    blocks = np.concatenate(head + [b.astype(np.uint8) for b in body], axis=-1)
    return blocks.reshape(out_dim, -1), fmt


def mlx_converted_checkpoint(src, progress: bool = True) -> Path:
    """The MLX checkpoint `src` with its quantized modules as the engine's blocks, made once into the cache."""
    from metal_engine.gguf_checkpoint import build_in_cache, cache_dir

    src = Path(src)
    cfg_text = (src / "config.json").read_text()
    cfg = json.loads(cfg_text)
    q = mlx_quantization(cfg)
    shards = _shards(src)
    key = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in shards) + "|" + cfg_text + "|v2"
    target = cache_dir() / f"{src.name}-mlx-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    tensors = {}
    for p in shards:
        tensors.update(_read_safetensors(p)[1])
    out, metadata = {}, {"format": "pt", "source": src.name, "quantization": "mlx affine"}
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
        blocks, fmt = repack(packed, _as_f32(*ws), _as_f32(*wb), group, bits, mod)
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
