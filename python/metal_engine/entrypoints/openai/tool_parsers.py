"""Tool calls in a model's output, in the formats of the model families (vLLM's tool parsers by name):

  hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call>, one block per call (Qwen2.5, Qwen3, Hermes)
  llama3_json  {"name": ..., "parameters": {...}} as the whole reply, calls joined by ';', optionally after
               <|python_tag|> (Llama 3.1 / 3.2 / 3.3)
  mistral      [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...] or [TOOL_CALLS]name[ARGS]{...} (Mistral)

and the JSON a grammar forces when tool_choice is "required" (an array of {"name", "parameters"}) or names a
function (its arguments object), as vLLM does it. A parser splits a reply into content and calls; streaming,
it says how much of the text is surely content, so a call's opening is never streamed as text.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Optional


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def call(name: str, arguments) -> dict:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": args}}


class ToolParser:
    name = ""
    markers: tuple = ()  # where a call may begin

    def extract(self, text: str) -> tuple[Optional[str], list]:
        """(content or None, calls) of a finished reply; text that does not parse stays content."""
        raise NotImplementedError

    def content_end(self, text: str) -> int:
        """How much of an unfinished reply is surely content: up to the first marker, less the end of the text
        that could still become one."""
        cut = len(text)
        for m in self.markers:
            i = text.find(m)
            if i >= 0:
                cut = min(cut, i)
        if cut < len(text):
            return cut
        for m in self.markers:  # a marker's first characters at the end: hold them back
            for k in range(min(len(m) - 1, len(text)), 0, -1):
                if text.endswith(m[:k]):
                    cut = min(cut, len(text) - k)
                    break
        return cut

    def complete_calls(self, text: str) -> list:
        """The calls of an unfinished reply that can no longer change (streamed as they complete)."""
        return []


class HermesParser(ToolParser):
    name = "hermes"
    markers = ("<tool_call>",)
    _block = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

    def _calls(self, text: str, blocks) -> list:
        out = []
        for b in blocks:
            try:
                obj = json.loads(b)
                out.append(call(obj["name"], obj.get("arguments", obj.get("parameters", {}))))
            except (ValueError, KeyError, TypeError):
                return None  # a block that is no call: the reply is content
        return out

    def extract(self, text):
        blocks = self._block.findall(text)
        calls = self._calls(text, blocks) if blocks else None
        if not calls:
            return text, []
        rest = self._block.sub("", text).strip()
        return rest or None, calls

    def complete_calls(self, text):
        return self._calls(text, self._block.findall(text)) or []


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    markers = ("<|python_tag|>", "{")

    def content_end(self, text):
        stripped = text.lstrip()
        if stripped.startswith("<|python_tag|>") or stripped.startswith("{") or "<|python_tag|>".startswith(stripped):
            return 0  # the reply may be a call: nothing is surely content until it ends
        return len(text)

    def extract(self, text):
        body = text.strip()
        if body.startswith("<|python_tag|>"):
            body = body[len("<|python_tag|>"):].strip()
        if not body.startswith("{"):
            return text, []
        calls = []
        dec = json.JSONDecoder()
        i = 0
        while i < len(body):
            try:
                obj, end = dec.raw_decode(body, i)
                calls.append(call(obj["name"], obj.get("parameters", obj.get("arguments", {}))))
            except (ValueError, KeyError, TypeError):
                return text, []
            i = end
            while i < len(body) and body[i] in " \n\t;":
                i += 1
        return None, calls


class MistralParser(ToolParser):
    name = "mistral"
    markers = ("[TOOL_CALLS]",)

    def extract(self, text):
        i = text.find("[TOOL_CALLS]")
        if i < 0:
            return text, []
        content = text[:i].strip() or None
        body = text[i + len("[TOOL_CALLS]"):].strip()
        try:
            if body.startswith("["):  # [{"name": ..., "arguments": ...}, ...]
                calls = [call(o["name"], o.get("arguments", o.get("parameters", {}))) for o in json.loads(body)]
            else:  # name[ARGS]{...}[TOOL_CALLS]name[ARGS]{...}
                calls = []
                for part in body.split("[TOOL_CALLS]"):
                    name, args = part.split("[ARGS]", 1)
                    calls.append(call(name.strip(), json.loads(args)))
        except (ValueError, KeyError, TypeError):
            return text, []
        return content, calls


PARSERS = {p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)}


def parser_for_template(template: Optional[str]) -> Optional[str]:
    """The tool-call format a chat template writes, by what it renders (None: no format we know)."""
    if not template:
        return None
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or ("ipython" in template and "parameters" in template):
        return "llama3_json"
    return None


def get_parser(name: str) -> ToolParser:
    if name not in PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; choose one of {', '.join(PARSERS)}")
    return PARSERS[name]()


# -------------------------------------------------------------------------- tool_choice required / named
def required_schema(tools: list, parallel: bool) -> dict:
    """The JSON vLLM makes the model write for tool_choice="required": an array of {"name", "parameters"}."""
    items = [{"type": "object", "properties": {"name": {"type": "string", "const": t["function"]["name"]},
                                               "parameters": t["function"].get("parameters") or {"type": "object"}},
              "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    schema = {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def parse_required(text: str) -> list:
    return [call(o["name"], o["parameters"]) for o in json.loads(text)]
