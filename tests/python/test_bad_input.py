"""Bad input gets a clear error naming the problem, never a crash; the engine stays usable."""

import json
import shutil

import numpy as np
import pytest

from engine_harness import Harness

import metal_engine


@pytest.fixture()
def checkpoint_copy(tmp_path, tiny_checkpoints):
    dst = tmp_path / "ck"
    shutil.copytree(tiny_checkpoints["llama"], dst)
    return dst


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_not_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        metal_engine.Engine(tmp_path / "nope")


def test_missing_safetensors(checkpoint_copy):
    (checkpoint_copy / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors"):
        metal_engine.Engine(checkpoint_copy)


def test_missing_config(checkpoint_copy):
    (checkpoint_copy / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json"):
        metal_engine.Engine(checkpoint_copy)


def test_truncated_safetensors(checkpoint_copy):
    f = checkpoint_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match="truncated"):
        metal_engine.Engine(checkpoint_copy)


@pytest.mark.parametrize("garbage", [b"", b"\x01\x02", b"\xff" * 64, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!}"])
def test_corrupt_safetensors(checkpoint_copy, garbage):
    (checkpoint_copy / "model.safetensors").write_bytes(garbage)
    with pytest.raises(ValueError, match="truncated|corrupt|invalid JSON|not a safetensors"):
        metal_engine.Engine(checkpoint_copy)


def test_shape_disagrees_with_config(checkpoint_copy):
    edit_config(checkpoint_copy, intermediate_size=90)
    with pytest.raises(ValueError, match=r"gate_proj.weight' has shape \[88, 64\] but config.json implies \[90, 64\]"):
        metal_engine.Engine(checkpoint_copy)


def test_dtype_disagrees_with_config(checkpoint_copy):
    edit_config(checkpoint_copy, dtype="bfloat16")
    with pytest.raises(ValueError, match="is F32 but config.json says dtype bf16"):
        metal_engine.Engine(checkpoint_copy)


def test_unsupported_architecture(checkpoint_copy):
    edit_config(checkpoint_copy, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        metal_engine.Engine(checkpoint_copy)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"rope_parameters": {"rope_type": "mrope", "rope_theta": 10000.0}}, "rope type 'mrope' is not supported"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0], "long_factor": [1.0]}},
         "longrope short_factor and long_factor need rotary_dim / 2 = 8 entries"),
        ({"hidden_act": "relu"}, "hidden_act 'relu' is not supported"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor is not used by LlamaForCausalLM"),
        ({"layer_types": ["full_attention", "chunked_attention"]}, "layer_types entry 'chunked_attention'"),
        ({"architectures": ["GPTNeoXForCausalLM"]}, "unsupported architecture 'GPTNeoXForCausalLM'"),
    ],
    ids=["rope-type", "longrope-factors", "activation", "partial-rotary", "layer-type", "architecture"],
)
def test_config_fields_we_cannot_honour_fail_at_load(checkpoint_copy, changes, message):
    edit_config(checkpoint_copy, **changes)
    with pytest.raises(ValueError, match=message):
        metal_engine.Engine(checkpoint_copy)


@pytest.mark.skipif("metal-sim" not in metal_engine._core.available_backends(), reason="no metal-sim in this build")
@pytest.mark.parametrize("changes,message", [
    ({"head_dim": 320}, r"head_dim 320 but the metal-sim backend's attention kernels take head_dim <= 256"),
    ({"head_dim": 256, "num_attention_heads": 8, "num_key_value_heads": 1},
     r"8 query heads of 256 dims per KV head but the metal-sim backend's attention kernels take at most 1024"),
])
def test_head_dim_past_a_backends_limit_fails_at_load(tmp_path, changes, message):
    """Heads a backend cannot serve: the cpu backend serves any; Metal's attention kernels say so at load."""
    from tiny_models import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path / "g", "gemma3", num_hidden_layers=1, **changes)
    with pytest.raises(ValueError, match=message):
        metal_engine.Engine(path, backend="metal-sim")
    engine = metal_engine.Engine(path, dtype="float32")
    (logits, _), = Harness(engine).prefill_and_decode([[5, 9, 2, 7]], 2)
    assert np.isfinite(logits).all()


def test_bad_dtype_argument(tiny_checkpoints):
    with pytest.raises(ValueError, match="unsupported dtype 'float8'"):
        metal_engine.Engine(tiny_checkpoints["llama"], dtype="float8")


def test_unknown_backend(tiny_checkpoints):
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        metal_engine.Engine(tiny_checkpoints["llama"], backend="tpu")


def test_bad_scratch_env(tiny_checkpoints, monkeypatch):
    monkeypatch.setenv("VLLM_METAL_SCRATCH_POOL_MB", "lots")
    with pytest.raises(ValueError, match="VLLM_METAL_SCRATCH_POOL_MB='lots'"):
        metal_engine.Engine(tiny_checkpoints["llama"])


def one_token_step(engine, **over):
    step = dict(token_ids=[5], positions=[0], query_start_loc=[0, 1], seq_lens=[1], block_tables=[[0]],
                slot_mapping=[0], logits_indices=[0])
    step.update(over)
    return engine.step(**step)


@pytest.fixture(scope="module")
def engine(tiny_checkpoints):
    return metal_engine.Engine(tiny_checkpoints["llama"], dtype="float32", num_kv_blocks=4, block_size=4)


@pytest.mark.parametrize(
    "over,exc,msg",
    [
        (dict(block_tables=[[4]], slot_mapping=[16]), IndexError, "block id 4 is out of range: the KV cache has blocks 0..3"),
        (dict(block_tables=[[-1]], slot_mapping=[-1]), IndexError, "block id -1 is out of range"),
        (dict(token_ids=[211]), ValueError, r"token id 211 at row 0 is outside the vocabulary \[0, 211\)"),
        (dict(token_ids=[-3]), ValueError, "token id -3"),
        (dict(seq_lens=[17], positions=[16], slot_mapping=[-1]), IndexError, "needs 5 KV blocks for 17 tokens but its block table holds 1"),
        (dict(slot_mapping=[99]), IndexError, "KV slot 99 does not exist: the cache has 16 slots"),
        (dict(slot_mapping=[3]), ValueError, r"slot_mapping\[0\] = 3 but sequence 0's block table puts context position 0 in slot 0"),
        (dict(query_start_loc=[0, 2]), ValueError, "query_start_loc must start at 0 and end at num_tokens"),
        (dict(positions=[0, 1]), ValueError, "positions has 2 entries for 1 tokens"),
        (dict(logits_indices=[1]), ValueError, r"logits_indices\[0\] = 1 is not a token row"),
        (dict(token_ids=[], positions=[], slot_mapping=[], query_start_loc=[0, 0]), ValueError, "token_ids is empty"),
    ],
)
def test_bad_step_is_refused_and_engine_survives(engine, over, exc, msg):
    good = one_token_step(engine)
    with pytest.raises(exc, match=msg):
        one_token_step(engine, **over)
    np.testing.assert_array_equal(one_token_step(engine), good)


def test_scratch_pool_too_small_names_the_knob(tiny_checkpoints):
    engine = metal_engine.Engine(tiny_checkpoints["llama"], dtype="float32", scratch_pool_mb=1)
    big = list(range(200)) * 8  # 1600 tokens: ~2 MiB of scratch (a layer's temporaries are reused by the next)
    h = Harness(engine)
    with pytest.raises(metal_engine.ScratchPoolExhausted, match=r"raise scratch_pool_mb \(env VLLM_METAL_SCRATCH_POOL_MB\) to at least"):
        h.prefill_and_decode([big], 0)
    # the engine still serves a step that fits
    (logits, _), = Harness(engine).prefill_and_decode([[1, 2, 3]], 1)
    assert np.isfinite(logits).all()
    assert 0 < engine.scratch_high_water_bytes <= 1 << 20


def test_positions_must_match_seq_lens(tiny_checkpoints):
    """Positions have one source of truth: a sequence's new tokens sit at the end of its seq_lens context."""
    eng = metal_engine.Engine(tiny_checkpoints["llama"], dtype="float32")
    toks = np.array([3, 4, 5], np.int32)
    bt = np.array([[1]], np.int32)
    slots = np.array([16, 17, 18], np.int64)
    ok = eng.step(toks, np.array([0, 1, 2]), np.array([0, 3]), np.array([3]), bt, slots)
    assert ok.shape[0] == 1
    with pytest.raises(ValueError, match=r"positions\[1\] = 5 but sequence 0 .* puts that token at position 1"):
        eng.step(toks, np.array([0, 5, 2]), np.array([0, 3]), np.array([3]), bt, slots)


# The cpu kernels' run-time choices, each read once per process (so each case starts a fresh one): a value outside
# the choices is refused, and asking for a path this build or machine lacks names why (skipped where it has it).
# (variable, value, the error's start, the `_core` function listing the choices where `value` is valid, or None)
CPU_ENV_CASES = [
    ("METAL_ENGINE_CPU_GEMM_BITS", "384", "METAL_ENGINE_CPU_GEMM_BITS='384'", None),  # the GEMM's vector width
    ("METAL_ENGINE_CPU_AMX", "yes", "METAL_ENGINE_CPU_AMX='yes'", None),  # quantized 6+ rows on AMX tiles
    ("METAL_ENGINE_CPU_AMX", "1", "METAL_ENGINE_CPU_AMX=1", "cpu_amx_choices"),
    ("METAL_ENGINE_CPU_QUANT_PANELS", "2", "METAL_ENGINE_CPU_QUANT_PANELS='2'", None),  # ... on int16 panels
    ("METAL_ENGINE_CPU_QUANT_PANELS", "1", "METAL_ENGINE_CPU_QUANT_PANELS=1", "cpu_quant_panels_choices"),
]


@pytest.mark.parametrize("var, value, message, choices", CPU_ENV_CASES, ids=[f"{c[0]}={c[1]}" for c in CPU_ENV_CASES])
def test_bad_cpu_kernel_env(tiny_checkpoints, var, value, message, choices):
    import os
    import subprocess
    import sys

    from metal_engine import _core

    if choices and True in getattr(_core, choices)():
        pytest.skip(f"this build and machine have the path: {var}={value} is valid here")
    code = "import sys, metal_engine; metal_engine.Engine(sys.argv[1], backend='cpu')"
    p = subprocess.run([sys.executable, "-c", code, str(tiny_checkpoints["llama"])], capture_output=True, text=True,
                       env={**os.environ, var: value}, timeout=120)
    assert p.returncode == 1 and f"ValueError: {message}" in p.stderr, p.stderr[-2000:]
