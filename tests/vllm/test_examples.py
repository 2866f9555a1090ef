"""vLLM's offline basics (offline_examples.py: what examples/offline_inference/basic/{basic,generate,chat}.py do)
on the default model, with vLLM's default multiprocessing engine core (VLLM_ENABLE_V1_MULTIPROCESSING unset)."""

import json
import os
import subprocess
import sys
from pathlib import Path


def test_offline_basics_on_the_default_model(default_model_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    env["VLLM_APPLE_USE_ENGINE"] = "1"
    script = Path(__file__).with_name("offline_examples.py")
    p = subprocess.run([sys.executable, str(script), "--model", str(default_model_dir), "--max-model-len", "1024",
                        "--max-tokens", "24"], env=env, capture_output=True, text=True, timeout=600)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stdout[-3000:] + p.stderr[-6000:]
    r = json.loads(line[0][len("RESULT "):])
    assert r["platform"] == "MetalEnginePlatform"
    assert r["prompts"][2] == "The capital of France is"
    for key in ("basic", "generate", "chat_one", "chat_batch"):
        assert all(t.strip() for t in r[key]), (key, r[key])
    assert len(r["chat_batch"]) == 10 and len(set(r["chat_batch"])) == 1  # greedy: ten equal conversations agree
    assert r["chat_batch"][0] == r["chat_one"][0]
    assert "Paris" in r["generate"][2] or "Paris" in r["basic"][2]
    assert "Traceback" not in p.stderr, p.stderr[-6000:]
