"""Tokenizer: Hugging Face `tokenizers` plus the chat template, loaded from a checkpoint folder.

Also builds a tokenizer.json from a GGUF file's embedded BPE vocabulary, and detokenizes
incrementally for streaming (vLLM's prefix/read offsets, so multi-byte characters never split).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence


class Tokenizer:
    def __init__(self, tokenizer, *, bos_token_id=None, eos_token_ids=(), chat_template=None, add_bos_token=False,
                 special_tokens=None):
        self._tok = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        self._special = special_tokens or {}

    def to_json_str(self) -> str:
        """The tokenizer as tokenizer.json text (what the structured-output backend builds its tokenizer from)."""
        return self._tok.to_str()

    @property
    def eos_token_id(self) -> Optional[int]:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @classmethod
    def from_checkpoint(cls, path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.exists():
            raise FileNotFoundError(
                f"{path} has no tokenizer.json: pass prompts as {{'prompt_token_ids': [...]}} or add the "
                "checkpoint's tokenizer files"
            )
        tok = HFTokenizer.from_file(str(tj))
        cfg = _read_json(path / "tokenizer_config.json")
        gen = _read_json(path / "generation_config.json")
        model_cfg = _read_json(path / "config.json")

        def token_id(value):
            if isinstance(value, dict):
                value = value.get("content")
            return tok.token_to_id(value) if isinstance(value, str) else None

        bos = token_id(cfg.get("bos_token"))
        if bos is None:
            bos = gen.get("bos_token_id", model_cfg.get("bos_token_id"))
        eos = gen.get("eos_token_id", model_cfg.get("eos_token_id"))
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        cfg_eos = token_id(cfg.get("eos_token"))
        if cfg_eos is not None and cfg_eos not in eos_ids:
            eos_ids.insert(0, cfg_eos)
        template = cfg.get("chat_template")
        if template is None and (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        specials = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            v = cfg.get(key)
            specials[key] = v.get("content") if isinstance(v, dict) else v
        return cls(tok, bos_token_id=bos, eos_token_ids=eos_ids, chat_template=template,
                   add_bos_token=bool(cfg.get("add_bos_token", False)), special_tokens=specials)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None and (
            not ids or ids[0] != self.bos_token_id
        ):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> Optional[str]:
        return self._tok.id_to_token(int(i))

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, chat_template: Optional[str] = None,
                            **kwargs) -> str:
        template = chat_template or self.chat_template
        if not template:
            raise ValueError("this model's tokenizer has no chat template: pass chat_template=... or use generate()")
        if not isinstance(messages, (list, tuple)) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages
        ):
            raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
        return _compile_template(template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **self._special, **kwargs
        )


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        return {}


_templates: dict = {}


def _compile_template(source: str):
    """Jinja2 in a sandbox, configured as transformers does for chat templates."""
    if source not in _templates:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        _templates[source] = env.from_string(source)
    return _templates[source]


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas; never emits half a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids[-6:])  # a little context so the first word's leading space survives
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def add(self, new_ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in new_ids)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset :], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""


# --- GGUF: the embedded BPE vocabulary as a tokenizer.json -------------------------------------------

# llama.cpp pre-tokenizer names -> Hugging Face pre-tokenizer pieces. GPT-2 byte-level BPE throughout.
_GGUF_PRE = {
    "smollm": "digits+bytelevel",
    "gpt2": "bytelevel",
    "default": "bytelevel",
}


def tokenizer_json_from_gguf(reader) -> tuple[dict, dict]:
    """(tokenizer.json, tokenizer_config.json) for a GGUF file's 'gpt2' (byte-level BPE) tokenizer."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    model = field("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"GGUF tokenizer model {model!r} is not supported yet (only byte-level BPE, 'gpt2')")
    pre = field("tokenizer.ggml.pre", "default")
    if pre not in _GGUF_PRE:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported yet (supported: {', '.join(_GGUF_PRE)})")
    tokens = field("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges", [])]
    types = field("tokenizer.ggml.token_type", [1] * len(tokens))
    tok = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    pieces = []
    if _GGUF_PRE[pre].startswith("digits"):
        pieces.append(pre_tokenizers.Digits(individual_digits=True))
    pieces.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pieces)
    tok.decoder = decoders.ByteLevel()
    control = [t for t, ty in zip(tokens, types) if ty == 3]  # llama.cpp's CONTROL tokens
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])

    def name(key):
        i = field(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    config = {
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(field("tokenizer.ggml.add_bos_token", False)),
        "chat_template": field("tokenizer.chat_template"),
    }
    return json.loads(tok.to_str()), config
