"""SamplingParams: how to pick each next token and when to stop, with vLLM's names and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

_GREEDY_EPS = 1e-5

_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """A constraint on the generated text, with vLLM's names: exactly one of a JSON schema (`json`, a dict or
    its JSON text), a `regex`, a `choice` of strings, a `grammar` (Lark, or GBNF as llama.cpp writes it), any
    JSON object (`json_object=True`) or `structural_tag` (vLLM's JSON: triggers and structures of begin /
    schema / end)."""

    json: Union[None, str, dict] = None
    regex: Optional[str] = None
    choice: Optional[list] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None
    structural_tag: Optional[str] = None
    disable_any_whitespace: bool = False        # JSON without optional whitespace between tokens
    disable_additional_properties: bool = False  # objects with properties take no others unless they say so
    disable_fallback: bool = False  # vLLM: no fallback to another backend; this engine has one, so always true
    whitespace_pattern: Optional[str] = None

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"invalid structured_outputs: {msg}")

        set_ = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(set_) != 1:
            bad(f"give exactly one of {', '.join(_KINDS)} (got {', '.join(set_) or 'none'})")
        if self.whitespace_pattern is not None:
            bad("whitespace_pattern is not supported (the guidance backend's JSON has no such option); use "
                "disable_any_whitespace=True for compact JSON")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            bad(f"json is a JSON schema (a dict or its JSON text), got {type(self.json).__name__}")
        for name in ("regex", "grammar", "structural_tag"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, str) or (name == "structural_tag" and isinstance(v, dict))):
                bad(f"{name} must be a string, got {type(v).__name__}")
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice
                                        or any(not isinstance(c, str) for c in self.choice)):
            bad("choice must be a non-empty list of strings")
        if self.json_object not in (None, True, False):
            bad("json_object must be true or false")

    @property
    def kind(self) -> tuple:
        """(kind, spec) of the one constraint given."""
        k = next(k for k in _KINDS if getattr(self, k) not in (None, False))
        return k, getattr(self, k)

    @property
    def key(self) -> tuple:
        """What the compiled grammar depends on (the grammar cache's key)."""
        import json as _json

        k, spec = self.kind
        spec = _json.dumps(spec, sort_keys=True) if isinstance(spec, (dict, list, tuple)) else str(spec)
        return k, spec, self.disable_any_whitespace, self.disable_additional_properties


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: all tokens
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    stop: Union[None, str, list[str]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: Optional[StructuredOutputsParams] = None
    logit_bias: Optional[dict] = None          # token id -> added to its logit (clamped to [-100, 100])
    allowed_token_ids: Optional[list] = None   # only these tokens may be sampled
    bad_words: Optional[list] = None           # words never generated (their last token banned after the rest)
    _stop_list: list = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"invalid SamplingParams: {msg}")

        if not isinstance(self.n, int) or self.n < 1:
            bad(f"n must be an integer >= 1, got {self.n!r}")
        if self.temperature is None or not self.temperature >= 0:
            bad(f"temperature must be >= 0, got {self.temperature!r}")
        if not (0 < self.top_p <= 1):
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad(f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}")
        if not (0 <= self.min_p <= 1):
            bad(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not (-2 <= self.presence_penalty <= 2):
            bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}")
        if not (-2 <= self.frequency_penalty <= 2):
            bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}")
        if not self.repetition_penalty > 0:
            bad(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                bad(f"{name} must be None or an integer >= 0, got {v!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            bad(f"seed must be an integer, got {self.seed!r}")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            bad("stop must be a non-empty string or a list of non-empty strings")
        self._stop_list = stops
        if self.stop_token_ids is not None and any(not isinstance(t, int) for t in self.stop_token_ids):
            bad("stop_token_ids must be a list of integers")
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            bad("structured_outputs must be a StructuredOutputsParams (or a dict of its fields)")
        if self.logit_bias is not None:
            try:
                self.logit_bias = {int(t): max(-100.0, min(100.0, float(b))) for t, b in self.logit_bias.items()}
            except (TypeError, ValueError, AttributeError):
                bad("logit_bias maps token ids to numbers")
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids or any(not isinstance(t, int) for t in self.allowed_token_ids):
                bad("allowed_token_ids must be a non-empty list of token ids")
        if self.bad_words is not None and any(not isinstance(w, str) or not w for w in self.bad_words):
            bad("bad_words must be a list of non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def stop_strings(self) -> list[str]:
        return self._stop_list

    def clone(self, **changes) -> "SamplingParams":
        values = {k: getattr(self, k) for k in self.__dataclass_fields__ if not k.startswith("_")}
        values.update(changes)
        return SamplingParams(**values)
