"""MLX affine checkpoints, laid out as mlx_lm.convert writes them (mlx-community): 2- to 8-bit linear layers and
the (tied) embedding as packed uint32 + scales + biases, norms in the checkpoint's float type. They load as
blocks holding the same values (Q4_1, Q5_1, A6, A8) and match the same weights dequantized
(w = scales * q + biases) to float32."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import metal_engine
from engine_harness import Harness
from tiny_models import make_tiny_text_checkpoint

IDS = [[5, 17, 33, 2, 9, 100, 41, 7], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]]


def mlx_quantize(w: np.ndarray, group: int, bits: int = 4):
    """(packed uint32 [out, in * bits / 32], scales, biases [out, in / group], dequantized f32): MLX's affine
    scheme, q = round((w - min) / scale) in 0..2^bits - 1 per group, scale = (max - min) / (2^bits - 1),
    bias = min, elements packed LSB first. Scales and biases are rounded to float16 (the file's dtype) first."""
    out, cols = w.shape
    top = 2**bits - 1
    g = w.reshape(out, cols // group, group).astype(np.float32)
    lo, hi = g.min(-1), g.max(-1)
    scales = np.maximum((hi - lo) / top, 1e-8).astype(np.float16)
    biases = lo.astype(np.float16)
    s32, b32 = scales.astype(np.float32)[..., None], biases.astype(np.float32)[..., None]
    q = np.clip(np.rint((g - b32) / s32), 0, top).astype(np.uint32)
    deq = (s32 * q.astype(np.float32) + b32).reshape(out, cols)
    # the row as one little-endian bit stream, element i at bits [i * bits, (i + 1) * bits), in 32-bit words
    stream = ((q.reshape(out, cols)[..., None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    packed = np.packbits(stream.reshape(out, cols * bits), axis=-1, bitorder="little").view("<u4")
    return packed, scales, biases, deq


def write_mlx(src, dst, group, overrides=None, bits=4):
    """An MLX checkpoint of `src` in dst, and its float32 twin (the dequantized weights) in dst_twin."""
    cfg = json.loads((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    mlx, twin = {}, {}
    for name, w in tensors.items():
        mod = name[: -len(".weight")]
        if w.ndim == 2 and name.endswith(".weight") and w.shape[1] % group == 0:
            packed, scales, biases, deq = mlx_quantize(w, group, bits)
            mlx[name], mlx[mod + ".scales"], mlx[mod + ".biases"] = packed, scales, biases
            twin[name] = deq
        else:
            mlx[name] = w.astype(np.float16)
            twin[name] = w.astype(np.float16).astype(np.float32)
    for d, t, dtype in ((dst, mlx, "float16"), (dst.with_name(dst.name + "_twin"), twin, "float32")):
        d.mkdir()
        save_file(t, str(d / "model.safetensors"), metadata={"format": "mlx"})
        c = dict(cfg, dtype=dtype)
        if d == dst:
            c["quantization"] = {"group_size": group, "bits": bits, **(overrides or {})}
            c["quantization_config"] = c["quantization"]
        (d / "config.json").write_text(json.dumps(c))
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (d / f).write_text((src / f).read_text())
    return dst, dst.with_name(dst.name + "_twin")


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (8, 64), (8, 32), (6, 64), (6, 128), (5, 32),
                                        (5, 64), (3, 64), (3, 128), (2, 32)])
def test_mlx_checkpoint_runs_from_its_blocks(tmp_path, monkeypatch, bits, group):
    """8-bit as A8 blocks, 6-bit as A6, 5-bit as Q5_1, 4-, 3- and 2-bit as Q4_1 (each the same values), against
    the same weights dequantized."""
    monkeypatch.setenv("METAL_ENGINE_CACHE", str(tmp_path / "cache"))
    src = make_tiny_text_checkpoint(tmp_path / "hf", "llama", seed=9, hidden_size=128, intermediate_size=256,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    mlx, twin = write_mlx(src, tmp_path / "mlx", group, bits=bits)
    llm = metal_engine.LLM(str(mlx), dtype="float32", progress=False)
    from safetensors import safe_open

    with safe_open(str(llm.llm_engine.model_path / "model.safetensors"), "np") as f:
        meta = f.metadata()
    fmt = {2: "q4_1", 3: "q4_1", 4: "q4_1", 5: "q5_1", 6: "a6", 8: "a8"}[bits]
    assert meta["quant.model.embed_tokens.weight"] == fmt  # the tied embedding / LM head too
    assert meta["quant.model.layers.0.mlp.down_proj.weight"] == fmt
    ref = Harness(metal_engine.Engine(twin, dtype="float32", kv_cache_memory=8 << 20)).prefill_and_decode(IDS, 6)
    got = Harness(llm.llm_engine.engine).prefill_and_decode(IDS, 6, forced=[t[len(p):] for (_, t), p in zip(ref, IDS)])
    for (a, _), (b, _) in zip(got, ref):
        assert np.abs(a - b).max() < 1e-3 * np.abs(b).max() + 1e-4


def test_mlx_checkpoints_the_engine_does_not_run_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("METAL_ENGINE_CACHE", str(tmp_path / "cache"))
    src = make_tiny_text_checkpoint(tmp_path / "hf", "llama", seed=9, hidden_size=128, intermediate_size=256,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    mlx, _ = write_mlx(src, tmp_path / "m7", 64, overrides={"bits": 7})
    with pytest.raises(ValueError, match="MLX 7-bit; metal_engine runs MLX 2-, 3-, 4-, 5-, 6- and 8-bit"):
        metal_engine.LLM(str(mlx), progress=False)
    mlx, _ = write_mlx(src, tmp_path / "g16", 64, overrides={"group_size": 16})
    with pytest.raises(ValueError, match="group_size 16; metal_engine takes 32, 64 or 128"):
        metal_engine.LLM(str(mlx), progress=False)
    # scales that do not divide the rows as config.json says
    mlx, _ = write_mlx(src, tmp_path / "bad", 64)
    cfg = json.loads((mlx / "config.json").read_text())
    cfg["quantization"]["group_size"] = 128
    (mlx / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not fit 128 weights per row in groups of 128|groups of 128"):
        metal_engine.LLM(str(mlx), progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        metal_engine.LLM(str(tmp_path / "g16"), quantization="q8_0", progress=False)
