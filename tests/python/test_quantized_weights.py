"""Quantized weights kept quantized (include/metal_engine/quant.h): a GGUF's blocks written as they are by the
converter and run in place by the engine, against the same file dequantized to float32 (its "twin"), on the
default model's own Q4_1 file and on tiny models written in every format. The kernels themselves:
tests/python/ops (every format x shape against float64, every instruction-set path)."""

import json

import numpy as np
import pytest
from safetensors import safe_open

import metal_engine
from engine_harness import Harness
from gguf_writer import write_gguf
from metal_engine.gguf_checkpoint import cached_checkpoint, default_checkpoint, default_gguf_path
from op_testing import GGUF_FORMATS
from tiny_models import make_tiny_text_checkpoint

PROMPTS = [
    "def fibonacci(n):",
    "The capital of France is",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "1, 2, 3, 4, 5,",
]
NEW_TOKENS = 32
# The Q4_1 default model against its float32 twin, both with float32 activations: the decode matmuls quantize
# each activation row to int16 (a scale per 256), which moves logits (magnitude up to ~45) by at most 0.011 over
# these prompts (measured; int8 activations per 32, as llama.cpp's, moved them by up to 1.1).
Q4_1_LOGIT_ATOL = 0.02


def test_conversion_keeps_the_default_models_blocks():
    """The quantized checkpoint holds the GGUF's blocks byte for byte (Q/K rows un-permuted, as whole rows),
    named by format in the metadata; norms are float32."""
    import gguf

    from metal_engine.gguf_checkpoint import _unpermute

    reader = gguf.GGUFReader(str(default_gguf_path()))
    raw = {t.name: t for t in reader.tensors}
    path = default_checkpoint(progress=False) / "model.safetensors"
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
        assert meta["quant.model.embed_tokens.weight"] == "q8_0"
        assert meta["quant.model.layers.3.mlp.down_proj.weight"] == "q4_1"
        assert "quant.model.layers.3.input_layernorm.weight" not in meta
        emb = f.get_tensor("model.embed_tokens.weight")
        assert emb.dtype == np.uint8 and emb.shape == (49152, 576 // 32 * 34)
        np.testing.assert_array_equal(emb.reshape(-1), np.asarray(raw["token_embd.weight"].data).view(np.uint8).reshape(-1))
        q = f.get_tensor("model.layers.3.self_attn.q_proj.weight")
        gq = np.asarray(raw["blk.3.attn_q.weight"].data).view(np.uint8).reshape(576, -1)
        np.testing.assert_array_equal(q, _unpermute(gq, 9))
        assert f.get_tensor("model.layers.3.input_layernorm.weight").dtype == np.float32
    twin = default_checkpoint(progress=False, dequantize=True) / "model.safetensors"
    assert path.stat().st_size < 0.2 * twin.stat().st_size  # blocks, not floats


@pytest.fixture(scope="module")
def prompt_ids():
    from metal_engine.tokenizer import Tokenizer

    tok = Tokenizer.from_checkpoint(default_checkpoint(progress=False))
    return [tok.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def twin_run(prompt_ids):
    engine = metal_engine.Engine(default_checkpoint(progress=False, dequantize=True), dtype="float32",
                                 kv_cache_memory=64 << 20)
    return Harness(engine).prefill_and_decode(prompt_ids, NEW_TOKENS)


def test_default_model_from_its_q4_1_file_against_its_f32_twin(prompt_ids, twin_run):
    """The Q4_1 model run natively, teacher-forced on its float32 twin's greedy tokens: logits within
    Q4_1_LOGIT_ATOL at every position; the greedy token the same wherever the twin's top two are further apart
    than twice that (closer ones are near-ties either may break)."""
    engine = metal_engine.Engine(default_checkpoint(progress=False), dtype="float32", kv_cache_memory=64 << 20)
    forced = [tokens[len(p):] for (_, tokens), p in zip(twin_run, prompt_ids)]
    runs = Harness(engine).prefill_and_decode(prompt_ids, NEW_TOKENS, forced=forced)
    decided = 0
    for (q_logits, _), (f_logits, _) in zip(runs, twin_run):
        assert q_logits.shape == f_logits.shape
        assert np.abs(q_logits - f_logits).max() < Q4_1_LOGIT_ATOL
        top2 = np.sort(f_logits, axis=-1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 2 * Q4_1_LOGIT_ATOL
        decided += int(clear.sum())
        assert (q_logits.argmax(-1) == f_logits.argmax(-1))[clear].all()
    assert decided > 100  # the check decided most positions


def test_default_model_greedy_text_from_its_q4_1_file(prompt_ids, twin_run):
    """Free-running greedy text of the Q4_1 model: the twin's up to the first near-tie of the twin's logits."""
    llm = metal_engine.LLM(dtype="float32", max_model_len=512, progress=False)  # the default model, as shipped
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids],
                        metal_engine.SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True),
                        use_tqdm=False)
    agreed = 0
    for out, (f_logits, f_tokens), p in zip(outs, twin_run, prompt_ids):
        got, want = out.outputs[0].token_ids, f_tokens[len(p):]
        top2 = np.sort(f_logits[len(p) - 1:], axis=-1)[:, -2:]
        n = 0
        while n < NEW_TOKENS and top2[n, 1] - top2[n, 0] > 2 * Q4_1_LOGIT_ATOL:
            n += 1
        assert got[:n] == want[:n]
        agreed += n
    assert agreed >= 16


def native_and_twin(gguf_path):
    """A GGUF run from its blocks, teacher-forced on the same file dequantized to float32, and that twin:
    [(logits, tokens)] per prompt, each."""
    ids = [[5, 17, 33, 2, 9, 100, 41, 7], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3]]
    twin = Harness(metal_engine.Engine(cached_checkpoint(gguf_path, progress=False, dequantize=True),
                                       dtype="float32", kv_cache_memory=8 << 20)).prefill_and_decode(ids, 8)
    forced = [t[len(p):] for (_, t), p in zip(twin, ids)]
    native = Harness(metal_engine.Engine(cached_checkpoint(gguf_path, progress=False), dtype="float32",
                                         kv_cache_memory=8 << 20)).prefill_and_decode(ids, 8, forced=forced)
    return native, twin


@pytest.mark.parametrize("fmt", GGUF_FORMATS)
def test_tiny_model_in_every_format_against_its_f32_twin(tmp_path, monkeypatch, fmt):
    """A tiny Llama written as a GGUF with every matrix in `fmt` (Q/K permuted as llama.cpp does) runs from
    its blocks, and its logits match the same file dequantized to float32."""
    monkeypatch.setenv("METAL_ENGINE_CACHE", str(tmp_path / "cache"))
    src = make_tiny_text_checkpoint(tmp_path / "hf", "llama", seed=3, hidden_size=256, intermediate_size=512,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    path = tmp_path / f"tiny-{fmt}.gguf"
    write_gguf(src, path, "llama", quant=fmt, seed=7)
    ckpt = cached_checkpoint(path, progress=False)
    with safe_open(str(ckpt / "model.safetensors"), "np") as f:
        assert f.metadata()["quant.model.layers.0.self_attn.q_proj.weight"] == fmt
    native, twin = native_and_twin(path)
    for (q, _), (f, _) in zip(native, twin):
        scale = np.abs(f).max()
        assert np.abs(q - f).max() < 0.05 * scale + 1e-3, (fmt, np.abs(q - f).max(), scale)
        assert ((q - f) ** 2).sum() / (f**2).sum() < 5e-4


def q4_k_m(name):
    """llama.cpp's Q4_K_M mix: Q4_K, with Q6_K for attn_v, ffn_down and the embedding / output."""
    if name.endswith(("attn_v.weight", "ffn_down.weight", "token_embd.weight", "output.weight")):
        return "q6_k"
    return "q4_k"


def test_q4_k_m_mix_runs_fused_parts_in_their_own_formats(tmp_path, monkeypatch):
    """A Q4_K_M-style file: q and k in Q4_K, v in Q6_K: the fused q | k | v projection runs one matmul per format
    into its columns of the output, and the model matches its float32 twin."""
    monkeypatch.setenv("METAL_ENGINE_CACHE", str(tmp_path / "cache"))
    src = make_tiny_text_checkpoint(tmp_path / "hf", "llama", seed=4, hidden_size=256, intermediate_size=512,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=64, attention_bias=True)
    path = tmp_path / "tiny-q4_k_m.gguf"
    write_gguf(src, path, "llama", quant=q4_k_m, seed=8)
    ckpt = cached_checkpoint(path, progress=False)
    with safe_open(str(ckpt / "model.safetensors"), "np") as f:
        m = f.metadata()
        assert m["quant.model.layers.0.self_attn.q_proj.weight"] == "q4_k"
        assert m["quant.model.layers.0.self_attn.v_proj.weight"] == "q6_k"
    native, twin = native_and_twin(path)
    for (q, _), (f, _) in zip(native, twin):
        assert ((q - f) ** 2).sum() / (f**2).sum() < 5e-4


def test_bad_quantized_checkpoints_are_refused_clearly(tmp_path):
    """A quantized tensor of the wrong byte shape, an unknown format, metadata naming a tensor the file lacks:
    errors naming the tensor and the problem."""
    from safetensors.numpy import save_file

    src = make_tiny_text_checkpoint(tmp_path / "hf", "llama", seed=1)
    cfg = json.loads((src / "config.json").read_text())
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    from safetensors.numpy import load_file

    tensors = load_file(str(src / "model.safetensors"))

    def try_load(extra_meta, replace):
        d = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            (d / f).write_text((src / f).read_text())
        save_file({**tensors, **replace}, str(d / "model.safetensors"), metadata={"format": "pt", **extra_meta})
        with pytest.raises(ValueError) as e:
            metal_engine.Engine(d, dtype="float32", kv_cache_memory=4 << 20)
        return str(e.value)

    name = "model.embed_tokens.weight"
    blocks = np.zeros((V, H // 32 * 34), np.uint8)
    assert "q8_0" in try_load({f"quant.{name}": "q8_0"}, {name: blocks[:, :-1]})  # rows not whole blocks
    msg = try_load({f"quant.{name}": "iq2_xxs"}, {name: blocks})
    assert name in msg and "iq2_xxs" in msg and "q4_1" in msg
    assert "missing.weight" in try_load({"quant.missing.weight": "q8_0"}, {})
    msg = try_load({f"quant.{name}": "q8_0"}, {name: blocks.astype(np.float32)})
    assert name in msg and "U8" in msg


def test_gguf_of_a_type_the_engine_does_not_run_is_refused(tmp_path, monkeypatch):
    import gguf

    monkeypatch.setenv("METAL_ENGINE_CACHE", str(tmp_path / "cache"))
    src = make_tiny_text_checkpoint(tmp_path / "hf", "llama", seed=2, hidden_size=256, intermediate_size=512,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    path = tmp_path / "q2k.gguf"
    write_gguf(src, path, "llama", quant="q4_k")
    # relabel one tensor Q2_K (84 bytes per 256): written by hand as gguf-py has no Q2_K quantizer
    reader = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(tmp_path / "q2k-2.gguf"), "llama")
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        w.add_key_value(f.name, f.contents(), f.types[0], f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.name == "blk.0.ffn_down.weight":
            rows = int(t.shape[1])
            w.add_tensor(t.name, np.zeros((rows, int(t.shape[0]) // 256 * 84), np.uint8),
                         raw_dtype=gguf.GGMLQuantizationType.Q2_K)
        else:
            w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_down\.weight.*Q2_K.*does not run"):
        metal_engine.LLM(str(tmp_path / "q2k-2.gguf"), progress=False)


@pytest.mark.skipif("metal-sim" not in metal_engine._core.available_backends(), reason="no metal-sim in this build")
def test_default_model_from_its_q4_1_file_on_metal():
    """The default model run from its blocks by the Metal kernels (matmul_q4_1, and Q8_0 for its tied embedding
    and LM head, on metal-sim): a 5-token prefill's logits equal its float32 twin's on the cpu backend up to reduction order (the
    Metal kernels take x in f32, not rounded as the cpu's integer kernels do), every row's argmax the same."""
    ids = [1, 4093, 2683, 314, 253]
    n = len(ids)
    step = dict(token_ids=np.array(ids, np.int32), positions=np.arange(n, dtype=np.int32),
                query_start_loc=np.array([0, n], np.int32), seq_lens=np.array([n], np.int32),
                block_tables=np.array([[0]], np.int32), slot_mapping=np.arange(n, dtype=np.int64),
                logits_indices=np.arange(n, dtype=np.int32))
    twin = metal_engine.Engine(default_checkpoint(progress=False, dequantize=True), dtype="float32",
                               kv_cache_memory=8 << 20).step(**step)
    engine = metal_engine.Engine(default_checkpoint(progress=False), backend="metal-sim", dtype="float32",
                                 kv_cache_memory=8 << 20)
    engine._engine.set_profiling(True)
    got = engine.step(**step)
    profile = engine._engine.take_profile()
    for kernel in ("matmul_gemm_q4_1", "embedding_q8_0", "matmul_gemm_q8_0"):  # its tied embedding is Q8_0
        assert profile.get(kernel, (0, 0))[0] > 0, sorted(profile)
    assert np.abs(got - twin).max() < 1e-3, np.abs(got - twin).max()
    np.testing.assert_array_equal(got.argmax(-1), twin.argmax(-1))
