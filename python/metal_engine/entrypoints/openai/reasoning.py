"""Reasoning parsers (vLLM's by name): a reply's thinking, between <think> and </think>, becomes
`reasoning_content`; the rest is the content (where tool calls are looked for).

  qwen3        thinking only when the reply opens with <think> (Qwen3's template writes an empty block itself
               when enable_thinking is false)
  deepseek_r1  everything before </think> is thinking (the template opens the block in the prompt)
"""

from __future__ import annotations

from typing import Optional

START, END = "<think>", "</think>"


class ReasoningParser:
    def __init__(self, name: str):
        if name not in ("qwen3", "deepseek_r1"):
            raise ValueError(f"unknown reasoning parser {name!r}; choose qwen3 or deepseek_r1")
        self.name = name

    def split(self, text: str, finished: bool) -> tuple[str, Optional[str], int]:
        """(reasoning so far, content so far or None while thinking, characters of `text` held back because they
        may still become a tag)."""
        body = text
        opened = body.lstrip().startswith(START)
        if opened:
            body = body.lstrip()[len(START):]
        elif self.name == "qwen3":
            if not finished and START.startswith(body.lstrip()) and body.strip():
                return "", None, len(text)  # may be the start of <think>
            return "", text, 0
        body = body.lstrip("\n")
        i = body.find(END)
        if i >= 0:
            return body[:i].rstrip("\n"), body[i + len(END):].lstrip("\n"), 0
        hold = 0
        if not finished:  # the end of the text may still become "\n</think>": hold it back
            for k in range(min(len(END) - 1, len(body)), 0, -1):
                if body.endswith(END[:k]):
                    hold = k
                    break
            hold += len(body[: len(body) - hold]) - len(body[: len(body) - hold].rstrip("\n"))
        return body[: len(body) - hold], None, hold
