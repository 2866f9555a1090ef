"""Request bodies of the OpenAI-compatible server (pydantic), and what happens to each field.

Every field a body may carry is one of three kinds:
  - honoured: a field of the models below, passed on to the engine;
  - refused: a known OpenAI field we cannot honour (UNSUPPORTED), a 400 naming it unless it has its no-op value;
  - unknown: anything else is kept out of the engine and logged once per field name (vLLM's behaviour for
    fields it does not know), so a misspelt field is visible in the server log.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("metal_engine.server")


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(BaseModel):
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Optional[dict] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class _Sampling(_Body):
    model: Optional[str] = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: Union[None, str, list[str]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    seed: Optional[int] = None
    user: Optional[str] = None  # an end-user id, for the operator's logs; no effect on the output
    response_format: Optional[ResponseFormat] = None
    # vLLM's extras
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: Optional[dict] = None
    allowed_token_ids: Optional[list[int]] = None
    bad_words: Optional[list[str]] = None
    cache_salt: Optional[str] = None  # prefix-cache blocks are shared only between requests with one salt


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = None
    echo: bool = False


class ContentPart(_Body):
    type: str = "text"
    text: Optional[str] = None


class FunctionCall(_Body):
    name: str
    arguments: str = "{}"


class ToolCall(_Body):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None
    reasoning_content: Optional[str] = None


class FunctionDefinition(_Body):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict] = None
    strict: Optional[bool] = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True
    # vLLM's extras
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    echo: bool = False  # vLLM: the reply starts with the last message's content (with continue_final_message)
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None


def _unset(v) -> bool:
    return v in (None, False, [], {}, "")


# Known OpenAI fields we do not honour: field -> (accepted as a no-op when, what to do instead)
UNSUPPORTED = {
    "suffix": (_unset, "insertion after a suffix is not supported"),
    "best_of": (lambda v: v in (None, 1), "best_of is not supported; use n"),
    "functions": (_unset, "the deprecated functions field is not supported; use tools"),
    "function_call": (_unset, "the deprecated function_call field is not supported; use tool_choice"),
    "audio": (_unset, "audio output is not supported"),
    "modalities": (lambda v: v in (None, ["text"]), "only the text modality is supported"),
    "prediction": (_unset, "predicted outputs are not supported"),
    "web_search_options": (_unset, "web search is not supported"),
    "store": (_unset, "stored completions are not supported (store must be false)"),
    "service_tier": (lambda v: v in (None, "auto", "default"), "service tiers are not supported"),
    "reasoning_effort": (_unset, "reasoning_effort is not supported; pass chat_template_kwargs "
                                 "(e.g. {\"enable_thinking\": false}) for models whose template takes it"),
    "verbosity": (_unset, "verbosity is not supported"),
    "metadata": (lambda v: True, ""),  # key-value tags for the caller's own records: accepted, kept out of the output
    "prompt_cache_key": (lambda v: True, ""),  # a routing hint: this server has one cache
    "safety_identifier": (lambda v: True, ""),  # an end-user id, as user
    "logprobs_mode": (_unset, "logprobs_mode is not supported (logprobs are of the processed distribution)"),
    "use_beam_search": (_unset, "beam search is not supported"),
    "guided_json": (_unset, "guided_json was removed by vLLM; use structured_outputs={'json': ...} or "
                            "response_format"),
    "guided_regex": (_unset, "guided_regex was removed by vLLM; use structured_outputs={'regex': ...}"),
    "guided_choice": (_unset, "guided_choice was removed by vLLM; use structured_outputs={'choice': [...]}"),
    "guided_grammar": (_unset, "guided_grammar was removed by vLLM; use structured_outputs={'grammar': ...}"),
}

_logged: set = set()


def check_fields(body: BaseModel) -> None:
    """Refuses known fields we cannot honour (ValueError naming the field) and logs unknown ones once."""
    _check(body, body.__class__.__name__)


def _check(body: BaseModel, where: str) -> None:
    for name, value in (body.model_extra or {}).items():
        if name in UNSUPPORTED:
            ok, why = UNSUPPORTED[name]
            if not ok(value):
                raise UnsupportedField(name, why)
            continue
        key = (where, name)
        if key not in _logged:
            _logged.add(key)
            log.warning("%s: ignoring the unknown field %r (not an OpenAI or vLLM field this server knows)",
                        where, name)
    for name in body.model_fields_set:
        v = getattr(body, name)
        for item in v if isinstance(v, list) else [v]:
            if isinstance(item, _Body):
                _check(item, f"{where}.{name}")


class UnsupportedField(ValueError):
    def __init__(self, field: str, why: str):
        super().__init__(f"the field '{field}' is not supported by this server: {why}")
        self.field = field
