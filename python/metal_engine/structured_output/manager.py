"""StructuredOutputManager: compiles (and caches) the grammars of requests, and fills the batch's bitmask."""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from typing import Optional

import numpy as np

from metal_engine.sampling_params import StructuredOutputsParams

_CACHE_SIZE = 256  # compiled grammars kept (the same schema from many requests compiles once)


def _no_extra_properties(schema):
    """vLLM's disable_additional_properties: every object schema with properties gets
    additionalProperties: false unless it says otherwise."""
    if isinstance(schema, dict):
        for key in ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas"):
            if isinstance(schema.get(key), dict):
                for sub in schema[key].values():
                    _no_extra_properties(sub)
        for key in ("additionalProperties", "items", "prefixItems", "allOf", "anyOf", "oneOf", "not", "if", "then",
                    "else", "contains"):
            if isinstance(schema.get(key), (dict, list)):
                _no_extra_properties(schema[key])
        if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        for item in schema:
            _no_extra_properties(item)
    return schema


def serialize_grammar(so: StructuredOutputsParams) -> str:
    """The llguidance grammar of a request's constraint; ValueError naming what is wrong with it."""
    import llguidance

    kind, spec = so.kind
    defaults = {"whitespace_flexible": not so.disable_any_whitespace}
    try:
        if kind in ("json", "json_object"):
            schema = {"type": "object"} if kind == "json_object" else spec
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError(f"a JSON schema is an object (or true / false), got {type(schema).__name__}")
            if so.disable_additional_properties:
                schema = _no_extra_properties(copy.deepcopy(schema))
            return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=defaults)
        if kind == "structural_tag":
            tag = json.loads(spec) if isinstance(spec, str) else spec
            triggers = tag.get("triggers") or []
            tags = []
            for s in tag.get("structures") or []:
                trigger = next((t for t in triggers if s["begin"].startswith(t)), None)
                if trigger is None:
                    raise ValueError(f"structural tag begin {s['begin']!r} starts with none of the triggers {triggers}")
                schema = s["schema"]
                if so.disable_additional_properties:
                    schema = _no_extra_properties(copy.deepcopy(schema))
                grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=defaults)
                tags.append(llguidance.StructTag(trigger=trigger, begin=s["begin"], grammar=grammar, end=s["end"]))
            if not tags:
                raise ValueError("the structural tag has no structures")
            return llguidance.StructTag.to_grammar(tags)
        return llguidance.grammar_from(kind, spec)  # regex, choice, grammar (Lark, or GBNF as llama.cpp writes it)
    except ValueError:
        raise
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"invalid structured_outputs {kind}: {e!r}") from None
    except Exception as e:  # llguidance's compile errors
        raise ValueError(f"invalid structured_outputs {kind}: {e}") from None


class StructuredOutputGrammar:
    """One sample's matcher: which tokens may come next, advanced by each token it produces."""

    def __init__(self, matcher, eos_token_ids):
        self.matcher = matcher
        self.eos_token_ids = set(eos_token_ids)

    def accept(self, token: int) -> None:
        if self.matcher.is_stopped():
            return  # the grammar is complete: only end-of-sequence tokens were allowed
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar matcher refused token {token}: {self.matcher.get_error()}")

    @property
    def is_terminated(self) -> bool:
        return self.matcher.is_stopped()


class StructuredOutputManager:
    def __init__(self, tokenizer, vocab_size: int):
        import llguidance

        self._llg = llguidance
        self.vocab_size = vocab_size
        eos = list(tokenizer.eos_token_ids)
        if not eos:
            raise ValueError("structured outputs need an end-of-sequence token; this tokenizer has none")
        self.eos_token_ids = eos
        self.tokenizer = llguidance.LLTokenizer(tokenizer.to_json_str(), n_vocab=vocab_size,
                                                eos_token=eos if len(eos) > 1 else eos[0])
        self._cache: OrderedDict = OrderedDict()
        self._executor = llguidance.LLExecutor()

    def grammar(self, so: StructuredOutputsParams) -> str:
        """The compiled grammar of a constraint, checked against this tokenizer (ValueError if it is invalid);
        cached by the constraint's key."""
        key = so.key
        g = self._cache.get(key)
        if g is not None:
            self._cache.move_to_end(key)
            return g
        g = serialize_grammar(so)
        err = self._llg.LLMatcher.validate_grammar(g, self.tokenizer)
        if err:
            raise ValueError(f"invalid structured_outputs {so.kind[0]}: {err}")
        self._cache[key] = g
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return g

    def matcher(self, so: StructuredOutputsParams) -> StructuredOutputGrammar:
        m = self._llg.LLMatcher(self.tokenizer, self.grammar(so))
        if m.is_error():
            raise ValueError(f"invalid structured_outputs {so.kind[0]}: {m.get_error()}")
        return StructuredOutputGrammar(m, self.eos_token_ids)

    def allowed(self, grammars: list) -> np.ndarray:
        """bool [len(grammars), vocab]: the tokens each matcher allows next (computed in parallel)."""
        words = (self.vocab_size + 31) // 32
        mask = np.zeros((len(grammars), words), dtype=np.int32)
        self._executor.unsafe_compute_mask_ptr([(g.matcher, i) for i, g in enumerate(grammars)],
                                               mask.ctypes.data, words * 4, len(grammars))
        bits = np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little")
        return bits[:, : self.vocab_size].astype(bool)
