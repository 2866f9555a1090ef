"""The Metal backend (src/metal/metal_device.cpp) end to end: backend="metal-sim" here, running the MSL kernels
against metal-sim's stand-in for the Metal framework; backend="metal" on a Mac. Tiny random Llama, Mistral (sliding window) and Qwen2 (qkv
bias) checkpoints end to end, compared with the cpu backend: prefill (the tiled prefill attention, chunked
and whole), decode (the per-row attention, and split-and-reduce over a context longer than a partition),
batched and alone; and LLM(..., backend="metal-sim") generates the cpu backend's greedy text."""

import os

import numpy as np
import pytest

from metal_engine import LLM, SamplingParams, _core
from metal_engine.engine import Engine
from engine_harness import Harness
from op_testing import GGUF_FORMATS
from tiny_models import ARCHS, make_tiny_checkpoint, make_tiny_text_checkpoint

METAL = "metal" if "metal" in _core.available_backends() else "metal-sim"
if METAL not in _core.available_backends():
    if os.environ.get("CI"):  # CI installs clang, libobjc and BlocksRuntime: the backend must be there
        raise RuntimeError("CI build has no metal-sim backend: " + str(_core.available_backends()))
    pytest.skip("this build has no metal-sim backend (needs clang, libobjc-12-dev, libblocksruntime-dev)",
                allow_module_level=True)

# logits are O(1..10); the backends differ in reduction order; with 16-bit weights the Metal backend also keeps
# activations in that type (the cpu backend, the reference, keeps them in f32)
TOL = {"float32": 2e-5, "float16": 1.5e-2, "bfloat16": 8e-2}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("metal_sim_backend")
    return {arch: make_tiny_checkpoint(root / arch, arch, seed=3, max_position_embeddings=1024) for arch in ARCHS}


def run(path, backend, dtype, prompts, decode_steps, batched=True, chunk=0, profile=None, forced=None,
        activation_dtype="auto"):
    engine = Engine(path, backend=backend, dtype=dtype, activation_dtype=activation_dtype, num_kv_blocks=96)
    if profile is not None:
        engine._engine.set_profiling(True)
    out = Harness(engine).prefill_and_decode(prompts, decode_steps, batched=batched, chunk=chunk, forced=forced)
    if profile is not None:
        profile.update(engine._engine.take_profile())
    return out


def assert_same(a, b, tol, rows_allowed_off=0.0):
    """rows_allowed_off: the share of logit rows that may differ by more than tol (a mixture of experts in bf16
    activations: a token whose top-k experts are near-tied may choose another expert than in f32)."""
    off = []
    for (la, ta), (lb, tb) in zip(a, b):
        if rows_allowed_off:
            off.append(np.abs(lb - la).max(axis=1) > tol)
        else:
            np.testing.assert_allclose(lb, la, atol=tol, rtol=0)
        assert ta == tb
    if off:
        off = np.concatenate(off)
        assert off.mean() <= rows_allowed_off, f"{off.sum()} of {len(off)} rows differ by more than {tol}"


MOE = ("mixtral", "qwen3_moe")


def decoded(result, prompts):
    """The decode tokens of a run, to force on another (near-ties break differently at 16-bit precision)."""
    return [tokens[len(p):] for (_, tokens), p in zip(result, prompts)]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_and_decode_match_cpu(checkpoints, arch, dtype):
    rng = np.random.default_rng(7)
    # 300 tokens: a context longer than one 256-key partition, so decode takes split-and-reduce attention
    prompts = [rng.integers(0, 211, n).tolist() for n in (300, 21, 2)]
    ref = run(checkpoints[arch], "cpu", dtype, prompts, decode_steps=3)
    profile = {}
    got = run(checkpoints[arch], METAL, dtype, prompts, decode_steps=3, profile=profile,
              forced=decoded(ref, prompts))
    assert_same(ref, got, TOL[dtype], rows_allowed_off=0.05 if arch in MOE and dtype == "bfloat16" else 0.0)
    w = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}[dtype]
    x = "" if w == "f32" else f"_act_{w}"  # 16-bit weights: 16-bit activations on Metal
    act = "gelu_tanh_mul" if arch.startswith("gemma") else "silu_mul"
    extra = [f"qk_norm_{w}{x}"] if arch in ("qwen3", "gemma3", "qwen3_moe") else []
    extra += ["softcap"] if arch == "gemma2" else []
    if arch in MOE:
        extra += ["moe_route", f"moe_matmul_{w}{x}", f"moe_combine{x}"]
    for kernel in [f"paged_attention_prefill_{w}{x}", f"paged_attention_split_{w}{x}", f"paged_attention_reduce{x}",
                   f"matmul_gemm_{w}{x}", f"matmul_gemv_{w}{x}", f"kv_write_{w}{x}", f"rope{x}", f"{act}{x}",
                   f"embedding_{w}{x}", f"rms_norm_{w}{x}", f"gather_rows{x}"] + extra:
        assert profile.get(kernel, (0, 0))[0] > 0, f"{kernel} never ran: {sorted(profile)}"
    if x:  # the LM head reads 16-bit activations and writes f32 logits
        assert profile[f"matmul_gemm_{w}{x}_logits"][0] + profile.get(f"matmul_gemv_{w}{x}_logits", (0, 0))[0] > 0


@pytest.mark.parametrize("dtype,activation_dtype", [("float32", "auto"), ("float16", "auto"),
                                                    ("bfloat16", "float32")])
@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_alone_and_short_contexts(checkpoints, arch, dtype, activation_dtype):
    """Prefill in 5-token chunks (the per-row attention over cached pages), then decode (the attention kernel
    fused with the KV write), each sequence alone; 16-bit weights with 16-bit or (asked for) f32 activations."""
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, 211, n).tolist() for n in (13, 6)]
    ref = run(checkpoints[arch], "cpu", dtype, prompts, decode_steps=4, batched=False, chunk=5)
    profile = {}
    got = run(checkpoints[arch], METAL, dtype, prompts, decode_steps=4, batched=False, chunk=5, profile=profile,
              forced=decoded(ref, prompts), activation_dtype=activation_dtype)
    tol = TOL["float32"] if dtype == "float32" else TOL[dtype] if activation_dtype == "auto" else 2e-3
    assert_same(ref, got, tol)
    w = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}[dtype]
    x = f"_act_{w}" if activation_dtype == "auto" and w != "f32" else ""
    assert profile[f"paged_attention_{w}{x}"][0] > 0 and f"paged_attention_prefill_{w}{x}" not in profile
    # decode steps write K/V inside the attention kernel: kv_write runs only for the prefill chunks
    assert profile[f"paged_attention_decode_{w}{x}"][0] > 0
    assert profile[f"kv_write_{w}{x}"][0] == profile[f"paged_attention_{w}{x}"][0]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_one_step_gives_each_sequence_its_own_attention_kernel(checkpoints, arch):
    """One step with two decode rows (short contexts), a 20-row prefill chunk and a decode row over 300 keys:
    the decode rows take the kernel fused with the KV write, the chunk the tiled prefill kernel, the long
    context split-and-reduce, all in that one step, and the logits equal the cpu backend's."""
    from engine_harness import Seq

    rng = np.random.default_rng(21)
    lens = {"a": 9, "b": 30, "c": 20, "d": 300}  # a, b, d decode their last token; c prefills its 20
    def step(backend, profile=None):
        engine = Engine(checkpoints[arch], backend=backend, dtype="float32", num_kv_blocks=96)
        h = Harness(engine)
        seqs = {k: Seq(tokens=rng_tokens[k]) for k in lens}
        h.step([(seqs[k], lens[k] - 1) for k in ("a", "b", "d")])  # everything but the last token cached
        if profile is not None:
            engine._engine.set_profiling(True)
            engine._engine.take_profile()
        out = h.step([(seqs["a"], 1), (seqs["b"], 1), (seqs["c"], 20), (seqs["d"], 1)], all_logits=True)
        if profile is not None:
            profile.update(engine._engine.take_profile())
        return np.concatenate(out)
    rng_tokens = {k: rng.integers(0, 211, n).tolist() for k, n in lens.items()}
    profile = {}
    ref, got = step("cpu"), step(METAL, profile)
    np.testing.assert_allclose(got, ref, atol=TOL["float32"], rtol=0)
    for kernel in ("paged_attention_decode_f32", "paged_attention_prefill_f32", "paged_attention_split_f32",
                   "paged_attention_reduce"):
        assert profile.get(kernel, (0, 0))[0] == engine_layers(checkpoints[arch]), (kernel, sorted(profile))
    assert "paged_attention_f32" not in profile


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gemma3_head_dim_256_matches_cpu(tmp_path, dtype):
    """Gemma 3's real heads (256 dims, 4 query heads over one KV head, as the 1B): the wide-head pipelines of the
    per-row, fused decode and split attention; a 40-token prompt takes the per-row kernel (the tiled prefill one
    holds heads up to 128) and a 300-key context split-and-reduce. Logits equal the cpu backend's."""
    path = make_tiny_checkpoint(tmp_path / "g", "gemma3", seed=4, head_dim=256, num_attention_heads=4,
                                num_key_value_heads=1, num_hidden_layers=2, sliding_window=24,
                                max_position_embeddings=1024)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 211, n).tolist() for n in (300, 40, 3)]
    ref = run(path, "cpu", dtype, prompts, decode_steps=3)
    profile = {}
    got = run(path, METAL, dtype, prompts, decode_steps=3, profile=profile, forced=decoded(ref, prompts))
    assert_same(ref, got, TOL[dtype])
    w = {"float32": "f32", "float16": "f16"}[dtype]
    x = "" if w == "f32" else f"_act_{w}"
    for kernel in (f"paged_attention_{w}{x}", f"paged_attention_decode_{w}{x}", f"paged_attention_split_{w}{x}"):
        assert profile.get(kernel, (0, 0))[0] > 0, f"{kernel} never ran: {sorted(profile)}"
    assert f"paged_attention_prefill_{w}{x}" not in profile


def engine_layers(path):
    import json

    return json.loads((path / "config.json").read_text())["num_hidden_layers"]


def test_activation_dtype_is_checked(checkpoints):
    assert Engine(checkpoints["llama"], backend=METAL, dtype="bfloat16").activation_dtype == "bf16"
    assert Engine(checkpoints["llama"], backend="cpu", dtype="bfloat16").activation_dtype == "f32"
    with pytest.raises(ValueError, match="cpu backend computes activations in float32"):
        Engine(checkpoints["llama"], backend="cpu", dtype="float16", activation_dtype="float16")
    with pytest.raises(ValueError, match="16-bit activations take the weights' dtype"):
        Engine(checkpoints["llama"], backend=METAL, dtype="float16", activation_dtype="bfloat16")


def test_batched_equals_alone_on_metal_sim(checkpoints):
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 211, n).tolist() for n in (17, 4, 9)]
    batched = run(checkpoints["llama"], METAL, "float32", prompts, decode_steps=3)
    alone = run(checkpoints["llama"], METAL, "float32", prompts, decode_steps=3, batched=False)
    assert_same(batched, alone, 1e-5)


def test_llm_generates_the_cpu_text(tmp_path):
    path = make_tiny_text_checkpoint(tmp_path / "tiny", "llama", seed=2)
    prompts = ["Hello world", "def fibonacci(n):", "The quick brown fox"]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    texts = {}
    for backend in ("cpu", METAL):
        llm = LLM(str(path), backend=backend, dtype="float32", max_model_len=256)
        outs = llm.generate(prompts, params, use_tqdm=False)
        texts[backend] = [(o.outputs[0].text, o.outputs[0].token_ids) for o in outs]
        assert llm.llm_engine.engine.backend == backend
    assert texts[METAL] == texts["cpu"]
    assert all(len(ids) == 12 for _, ids in texts["cpu"])


def test_unknown_backend_names_what_the_build_has(checkpoints):
    other = "metal-sim" if METAL == "metal" else "metal"
    with pytest.raises(ValueError, match=f"this build has 'cpu', '{METAL}'"):
        Engine(checkpoints["llama"], backend=other)


@pytest.mark.parametrize("backend", ["cpu", METAL])
def test_greedy_step_picks_on_the_device(checkpoints, backend):
    """step(greedy=True) returns each row's argmax, chosen by the argmax kernel, without reading logits back."""
    path = checkpoints["qwen2"]
    rng = np.random.default_rng(2)
    prompt = rng.integers(0, 211, 9).astype(np.int32)
    rows = np.arange(9, dtype=np.int32)
    call = dict(token_ids=prompt, positions=np.arange(9, dtype=np.int32),
                query_start_loc=np.array([0, 9], np.int32), seq_lens=np.array([9], np.int32),
                block_tables=np.array([[0]], np.int32), slot_mapping=np.arange(9, dtype=np.int64), logits_indices=rows)
    logits = Engine(path, backend=backend, dtype="float32", num_kv_blocks=4).step(**call)
    engine = Engine(path, backend=backend, dtype="float32", num_kv_blocks=4)
    engine._engine.set_profiling(True)
    tokens = engine.step(**call, greedy=True)
    assert tokens.dtype == np.int32 and tokens.shape == (9,)
    np.testing.assert_array_equal(tokens, logits.argmax(-1))
    assert engine._engine.take_profile()["argmax"][0] == 1


# ------------------------------------------------------------------------------------------ quantized weights
def _tiny_gguf(tmp_path, fmt, seed=3, **overrides):
    """A tiny Llama written as a GGUF with its matrices in `fmt` (a name, or a function of the tensor name) and
    its cached checkpoint (rows of 256: whole K-quant super-blocks)."""
    from gguf_writer import write_gguf
    from metal_engine.gguf_checkpoint import cached_checkpoint

    cfg = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    src = make_tiny_text_checkpoint(tmp_path / "hf", "llama", seed=seed, **{**cfg, **overrides})
    path = tmp_path / "tiny.gguf"
    write_gguf(src, path, "llama", quant=fmt, seed=seed + 4)
    return cached_checkpoint(path, progress=False)


QUANT_PROMPTS = [list(range(5, 26)), [7, 3]]  # a 21-token prefill (the GEMM kernels) and decode rows (the GEMV)


@pytest.mark.parametrize("fmt", GGUF_FORMATS)
def test_quantized_gguf_matches_cpu(tmp_path, monkeypatch, fmt):
    """Every matrix (the embedding, tied to the LM head, included) in one GGUF format, run from its blocks by
    matmul_<q> / embedding_<q> (matmul_quant.metal) on Metal and by the cpu backend's integer kernels: the logits
    agree within the cpu's int16 activation rounding."""
    monkeypatch.setenv("METAL_ENGINE_CACHE", str(tmp_path / "cache"))
    ckpt = _tiny_gguf(tmp_path, fmt)
    ref = run(ckpt, "cpu", "float32", QUANT_PROMPTS, decode_steps=3)
    profile = {}
    got = run(ckpt, METAL, "float32", QUANT_PROMPTS, decode_steps=3, profile=profile, forced=decoded(ref, QUANT_PROMPTS))
    scale = max(np.abs(l).max() for l, _ in ref)
    assert_same(ref, got, 1e-3 * scale)
    for kernel in (f"matmul_gemm_{fmt}", f"matmul_gemv_{fmt}", f"embedding_{fmt}"):
        assert profile.get(kernel, (0, 0))[0] > 0, f"{kernel} never ran: {sorted(profile)}"


def test_quantized_mix_with_biases_in_16bit_activations(tmp_path, monkeypatch):
    """A Q4_K_M-style file (q/k Q4_K, v, the embedding and the output Q6_K: the fused q | k | v runs a matmul per format into
    its columns) with attention biases, on Metal with f16 activations (matmul_<q>_act_f16 and its _logits
    flavour for the LM head) against the cpu backend."""
    monkeypatch.setenv("METAL_ENGINE_CACHE", str(tmp_path / "cache"))

    def q4_k_m(name):
        return "q6_k" if name.endswith(("attn_v.weight", "ffn_down.weight", "token_embd.weight", "output.weight")) \
            else "q4_k"

    ckpt = _tiny_gguf(tmp_path, q4_k_m, attention_bias=True)
    ref = run(ckpt, "cpu", "float16", QUANT_PROMPTS, decode_steps=3)
    profile = {}
    got = run(ckpt, METAL, "float16", QUANT_PROMPTS, decode_steps=3, profile=profile,
              forced=decoded(ref, QUANT_PROMPTS))
    scale = max(np.abs(l).max() for l, _ in ref)
    # f16 activations on Metal against the cpu's f32 ones, whose matmuls quantize x to int16 (per group of 32): that
    # alone moves this random model's logits (|l| up to ~160) by up to ~1, the f16 activations by ~2.8
    assert_same(ref, got, 2.5e-2 * scale)
    for kernel in ("matmul_gemm_q4_k_act_f16", "matmul_gemv_q6_k_act_f16", "embedding_q6_k_act_f16"):
        assert profile.get(kernel, (0, 0))[0] > 0, f"{kernel} never ran: {sorted(profile)}"
    assert any(k.endswith("_act_f16_logits") and "q6_k" in k for k in profile), sorted(profile)


@pytest.mark.parametrize("arch", MOE)
def test_quantized_experts_match_cpu(tmp_path, monkeypatch, checkpoints, arch):
    """A mixture of experts quantized at load (quantization='q8_0'): the experts through moe_matmul_q8_0."""
    monkeypatch.setenv("METAL_ENGINE_CACHE", str(tmp_path / "cache"))
    from metal_engine.quantization import quantized_checkpoint

    ckpt = quantized_checkpoint(checkpoints[arch], "q8_0", progress=False)
    ref = run(ckpt, "cpu", "float32", QUANT_PROMPTS, decode_steps=3)
    profile = {}
    got = run(ckpt, METAL, "float32", QUANT_PROMPTS, decode_steps=3, profile=profile, forced=decoded(ref, QUANT_PROMPTS))
    scale = max(np.abs(l).max() for l, _ in ref)
    assert_same(ref, got, 1e-3 * scale)
    assert profile.get("moe_matmul_q8_0", (0, 0))[0] > 0, sorted(profile)


def test_the_backend_runs_from_the_embedded_source(checkpoints, monkeypatch, tmp_path):
    """METAL_ENGINE_METALLIB='' skips the metallib: the backend compiles the MSL source embedded in the library
    (newLibraryWithSource:, which on metal-sim checks it is the text its kernels were built from), and gives the
    same logits as from a metallib."""
    import pathlib
    import subprocess
    import sys

    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 211, n).tolist() for n in (9, 3)]
    if METAL == "metal-sim":  # metal-sim's metallib (what the install puts beside the extension), written here
        root = pathlib.Path(__file__).resolve().parents[3]
        lib = tmp_path / "metal_engine.metallib"
        subprocess.run([sys.executable, str(root / "tools" / "metal_prepass.py"), "--library", str(lib),
                        *map(str, sorted((root / "metal").glob("*.metal")))], check=True)
        monkeypatch.setenv("METAL_ENGINE_METALLIB", str(lib))
    else:
        monkeypatch.delenv("METAL_ENGINE_METALLIB", raising=False)
    from_lib = Engine(checkpoints["qwen3"], backend=METAL, dtype="float32", num_kv_blocks=32)
    monkeypatch.setenv("METAL_ENGINE_METALLIB", "")
    from_source = Engine(checkpoints["qwen3"], backend=METAL, dtype="float32", num_kv_blocks=32)
    assert from_source._engine.device_description.endswith("kernels from the embedded MSL source")
    if METAL == "metal-sim":
        assert from_lib._engine.device_description.endswith(f"kernels from {lib}")
    a = Harness(from_lib).prefill_and_decode(prompts, 2)
    b = Harness(from_source).prefill_and_decode(prompts, 2)
    assert_same(a, b, 0.0)


@pytest.mark.skipif(METAL != "metal-sim", reason="metal-sim's dispatch orders and fault injection")
@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "gemma3"])
def test_barriers_only_where_needed_and_every_one_needed(checkpoints, monkeypatch, arch):
    """The backend puts a memory barrier only before a dispatch that reads or writes what one since the last
    barrier wrote (or writes what one read), so some dispatches run concurrently; metal-sim runs the threadgroups
    of dispatches with no barrier between them interleaved, and the engine matches the cpu backend in seeded
    random orders and last-to-first; leaving out any one needed barrier (METAL_ENGINE_SKIP_BARRIER=n) breaks it."""
    rng = np.random.default_rng(9)
    prompts = [rng.integers(0, 211, n).tolist() for n in (21, 2)]
    ref = run(checkpoints[arch], "cpu", "float32", prompts, decode_steps=3)
    forced = decoded(ref, prompts)
    for seed, reverse in (("0", "0"), ("5", "0"), ("0", "1")):
        monkeypatch.setenv("METAL_SIM_SEED", seed)
        monkeypatch.setenv("METAL_SIM_REVERSE_ORDER", reverse)
        profile = {}
        got = run(checkpoints[arch], METAL, "float32", prompts, decode_steps=3, profile=profile, forced=forced)
        assert_same(ref, got, TOL["float32"])
    dispatches = sum(calls for k, (calls, _) in profile.items() if not k.startswith("("))
    assert 0 < profile["(memory barriers)"][0] < dispatches, (profile["(memory barriers)"], dispatches)
    for n in (1, 4, 9):
        monkeypatch.setenv("METAL_ENGINE_SKIP_BARRIER", str(n))
        got = run(checkpoints[arch], METAL, "float32", prompts, decode_steps=3, forced=forced)
        err = max(np.abs(a - b).max() for (a, _), (b, _) in zip(ref, got))
        assert err > 1e-2, (n, err)
