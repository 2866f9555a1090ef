"""Structured output: grammar-constrained decoding, as vLLM's v1 structured_output does it.

A request's `SamplingParams.structured_outputs` (vLLM's StructuredOutputsParams: a JSON schema, a regex, a
choice of strings, a Lark or GBNF grammar, any JSON object, or structural tags) is compiled once into a grammar
(cached by its key), and each sample of the request gets its own matcher. Every step, the matchers of the
constrained rows fill one token bitmask (int32 [rows, ceil(vocab / 32)], bit t of a row set when token t is
allowed), applied to those rows' logits before sampling; the sampled token then advances the matcher.

The backend is llguidance (vLLM's "guidance" backend, built on the same library): it needs nothing but the
tokenizer's tokenizer.json, where xgrammar would bring torch, transformers and triton into the engine's
runtime. Preemption in this engine recomputes a request from its tokens and keeps what it produced, so a
matcher never has to roll back.
"""

from metal_engine.structured_output.manager import StructuredOutputGrammar, StructuredOutputManager

__all__ = ["StructuredOutputGrammar", "StructuredOutputManager"]
