"""The command line: `metal-engine generate "prompt"` and `metal-engine chat` (also `python -m metal_engine`)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional


def _engine_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default=None, help="checkpoint folder or .gguf file (default: SmolLM2-135M-Instruct)")
    g.add_argument("--backend", default="auto", choices=["auto", "cpu", "metal", "metal-sim"])
    g.add_argument("--dtype", default="auto", help="auto | float32 | float16 | bfloat16")
    g.add_argument("--kv-cache-dtype", default="auto", help="auto (the weights' float dtype) | float32 | float16 | bfloat16")
    g.add_argument("--quantization", default=None, choices=["q8_0", "q4_0", "q4_k"],
                   help="quantize a float checkpoint's matrices at load (cached beside converted GGUFs)")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--kv-cache-memory", type=int, default=None, help="bytes for the KV cache (default 256 MiB)")
    g.add_argument("--threads", type=int, default=None, help="cpu backend threads (default 0: all cores)")


def _sampling_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def _build(args):
    from metal_engine import LLM, SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                            presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                            seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)
    llm = LLM(args.model, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization,
              backend=args.backend,
              max_model_len=args.max_model_len,
              kv_cache_memory=args.kv_cache_memory, num_threads=args.threads)
    return llm, params


def cmd_generate(args) -> int:
    llm, params = _build(args)
    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    if not args.no_echo:
        sys.stdout.write(prompt)
    for delta in llm.stream(prompt, params):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args) -> int:
    llm, params = _build(args)
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write(">>> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        for delta in llm.chat_stream(messages, params):
            reply.append(delta.text)
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def cmd_serve(args) -> int:
    try:
        from metal_engine.entrypoints.openai import api_server as server
    except ImportError as e:
        raise RuntimeError(f"metal-engine serve needs the server extra ({e.name} is missing): "
                           "pip install 'metal_engine[serve]'") from None
    from metal_engine.config import EngineConfig
    from metal_engine.llm_engine import LLMEngine

    given = dict(kv_cache_memory=args.kv_cache_memory, num_threads=args.threads)
    config = EngineConfig(model=args.model, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype,
                          quantization=args.quantization, backend=args.backend,
                          max_model_len=args.max_model_len,
                          max_num_seqs=args.max_num_seqs, **{k: v for k, v in given.items() if v is not None})
    engine = LLMEngine(config)
    name = args.served_model_name or server.default_model_name(args.model)
    server.serve(engine, args.host, args.port, name, api_key=args.api_key, max_waiting=args.max_waiting,
                 log_level=args.log_level, tool_call_parser=args.tool_call_parser,
                 reasoning_parser=args.reasoning_parser)
    return 0


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="metal-engine", description="metal_engine: LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="complete a prompt, streaming the text")
    g.add_argument("prompt", help="the prompt ('-' reads stdin)")
    g.add_argument("--no-echo", action="store_true", help="print only the completion")
    _engine_args(g)
    _sampling_args(g)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="interactive chat through the model's chat template (/reset, /exit)")
    c.add_argument("--system", default=None, help="system prompt")
    _engine_args(c)
    _sampling_args(c)
    c.set_defaults(func=cmd_chat)
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    _engine_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    s.add_argument("--served-model-name", default=None, help="the model id clients send (default: from --model)")
    s.add_argument("--max-num-seqs", type=int, default=64, help="sequences per step")
    s.add_argument("--max-waiting", type=int, default=256, help="waiting requests beyond this get 503")
    s.add_argument("--log-level", default="info")
    s.add_argument("--tool-call-parser", default=None, choices=["hermes", "llama3_json", "mistral"],
                   help="the models' tool-call format for tool_choice 'auto' (default: from the chat template)")
    s.add_argument("--reasoning-parser", default=None, choices=["qwen3", "deepseek_r1"],
                   help="split <think>...</think> into reasoning_content")
    s.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted for vLLM's command lines: tool_choice 'auto' is on whenever the format is known")
    s.set_defaults(func=cmd_serve)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"metal-engine: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
