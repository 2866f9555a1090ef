"""LLM: the offline API, as vLLM's.

    from metal_engine import LLM, SamplingParams
    llm = LLM(model="path/to/checkpoint", dtype="float16", max_model_len=2048)
    outputs = llm.generate(["def fibonacci(n):"], SamplingParams(max_tokens=100, temperature=0.0))
    print(outputs[0].outputs[0].text)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

from metal_engine.config import EngineConfig
from metal_engine.llm_engine import LLMEngine, PromptType
from metal_engine.sampling_params import SamplingParams


@dataclass
class StreamDelta:
    """What one sample of a streamed request produced since the previous delta."""

    request_id: str
    index: int  # which of the n samples
    text: str
    token_ids: list
    finished: bool
    finish_reason: Optional[str] = None


class LLM:
    def __init__(self, model: Optional[str] = None, *, dtype: str = "auto", activation_dtype: str = "auto",
                 kv_cache_dtype: str = "auto", quantization: Optional[str] = None,
                 max_model_len: Optional[int] = None,
                 backend: str = "auto", block_size: Optional[int] = None, kv_cache_memory: Optional[int] = None,
                 num_kv_blocks: Optional[int] = None, max_num_seqs: int = 64,
                 max_num_batched_tokens: Optional[int] = None, enable_prefix_caching: bool = True, seed: int = 0,
                 scratch_pool_mb: Optional[int] = None, num_threads: Optional[int] = None,
                 strict: Optional[bool] = None, progress: bool = True, **engine_args):
        """Knobs left None take EngineConfig's default (python/metal_engine/config.py), itself the native
        engine's where it has the knob. vLLM's engine-argument names work too (engine_args.py:
        num_gpu_blocks_override, gpu_memory_utilization, kv_cache_memory_bytes, tokenizer, enforce_eager,
        tensor_parallel_size=1, ...); those we cannot honour are a ValueError naming them."""
        from metal_engine.engine_args import apply_engine_args

        knobs = dict(block_size=block_size, kv_cache_memory=kv_cache_memory, num_threads=num_threads,
                     quantization=quantization, num_kv_blocks=num_kv_blocks)
        apply_engine_args(engine_args, knobs)
        config = EngineConfig(model=None if model is None else str(model), dtype=dtype,
                              activation_dtype=activation_dtype, kv_cache_dtype=kv_cache_dtype, backend=backend,
                              max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=max_num_batched_tokens,
                              enable_prefix_caching=enable_prefix_caching, scratch_pool_mb=scratch_pool_mb,
                              strict=strict, seed=seed, **{k: v for k, v in knobs.items() if v is not None})
        self.llm_engine = LLMEngine(config, progress=progress)

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    # ------------------------------------------------------------------------------------------
    def _add_all(self, prompts, sampling_params) -> list:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        ids = []
        try:
            for i, (p, sp) in enumerate(zip(prompts, params)):
                try:
                    ids.append(self.llm_engine.add_request(p, sp))
                except ValueError as e:
                    raise ValueError(f"prompt {i}: {e}") from None
        except ValueError:
            for rid in ids:  # this call's earlier prompts; other callers' requests are untouched
                self.llm_engine.abort_request(rid)
            raise
        return ids

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
                 use_tqdm: bool = True) -> list:
        """Runs every prompt to completion with continuous batching; outputs in input order."""
        ids = self._add_all(prompts, sampling_params)
        pending = set(ids)
        done: dict = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="Processed prompts", unit="req")
        try:
            while pending:
                for out in self.llm_engine.step():
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for rid in pending:
                self.llm_engine.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [done[i] for i in ids]

    def chat(self, messages, sampling_params: Optional[SamplingParams] = None, use_tqdm: bool = True,
             chat_template: Optional[str] = None, add_generation_prompt: bool = True, tools: Optional[list] = None,
             chat_template_kwargs: Optional[dict] = None) -> list:
        """messages: one conversation (a list of {'role', 'content'} dicts) or a list of them. tools (OpenAI's
        function definitions) and chat_template_kwargs go to the chat template, as in vLLM's LLM.chat."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        kwargs = dict(chat_template_kwargs or {})
        if tools is not None:
            kwargs["tools"] = tools
        texts = [self._chat_text(c, chat_template, add_generation_prompt, kwargs) for c in conversations]
        tok = self.get_tokenizer()
        prompts = [{"prompt_token_ids": tok.encode(t, add_special_tokens=False), "prompt": None} for t in texts]
        outs = self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
        for o, t in zip(outs, texts):
            o.prompt = t
        return outs

    def _chat_text(self, conversation, chat_template, add_generation_prompt, kwargs=None) -> str:
        tok = self.get_tokenizer()
        if tok is None:
            raise ValueError("chat needs a tokenizer; this checkpoint has no tokenizer.json")
        return tok.apply_chat_template(conversation, add_generation_prompt, chat_template, **(kwargs or {}))

    def _chat_ids(self, conversation, chat_template, add_generation_prompt) -> list:
        text = self._chat_text(conversation, chat_template, add_generation_prompt)
        return self.get_tokenizer().encode(text, add_special_tokens=False)

    def stream(self, prompt: PromptType, sampling_params: Optional[SamplingParams] = None) -> Iterator[StreamDelta]:
        """Yields text and token deltas as they are produced. Text that could still turn out to be the
        start of a stop string is held back until it cannot."""
        [rid] = self._add_all(prompt, sampling_params)
        engine = self.llm_engine
        sent_text: dict = {}
        sent_tokens: dict = {}
        holdback = engine.stop_string_holdback(sampling_params or SamplingParams())
        try:
            finished = False
            while not finished:
                for out in engine.step():
                    if out.request_id != rid:
                        continue
                    for c in out.outputs:
                        t0, k0 = sent_text.get(c.index, 0), sent_tokens.get(c.index, 0)
                        done = c.finish_reason is not None
                        visible = len(c.text) if done else max(t0, len(c.text) - holdback)
                        if visible > t0 or len(c.token_ids) > k0 or done and c.index not in sent_text:
                            sent_text[c.index], sent_tokens[c.index] = visible, len(c.token_ids)
                            yield StreamDelta(rid, c.index, c.text[t0:visible], list(c.token_ids[k0:]), done,
                                              c.finish_reason)
                    finished = out.finished
        finally:
            engine.abort_request(rid)  # no-op once finished; frees blocks if the consumer stopped early

    def chat_stream(self, messages, sampling_params: Optional[SamplingParams] = None,
                    chat_template: Optional[str] = None) -> Iterator[StreamDelta]:
        ids = self._chat_ids(messages, chat_template, True)
        return self.stream({"prompt_token_ids": ids}, sampling_params)

