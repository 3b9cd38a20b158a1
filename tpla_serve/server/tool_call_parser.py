"""DeepSeek-V3's tool-call format (SGLang's `--tool-call-parser deepseekv3`) as OpenAI tool_calls.

    text before<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    {"arg": ...}
    ```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>

The text before the block is the message's content; each call names a function of the request's tools
and carries a JSON object of arguments. A block that does not parse (bad JSON, a function the request
did not offer) is no tool call: the whole output stays content, as the model wrote it.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass

logger = logging.getLogger(__name__)

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"
_CALL = re.compile(re.escape(CALL_BEGIN) + r"(.*?)" + re.escape(SEP) + r"(.*?)\n```json\n(.*?)\n```"
                   + re.escape(CALL_END), re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI's `function.arguments`
    id: str

    def openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


@dataclass(frozen=True)
class ToolSplit:
    content: str
    calls: tuple[ToolCall, ...]


def _parse_call(kind: str, name: str, raw_args: str, tools: frozenset[str]) -> ToolCall | None:
    name = name.strip()
    if kind.strip() != "function" or name not in tools:
        logger.warning("the model called %r, which the request did not offer; kept as content", name)
        return None
    try:
        args = json.loads(raw_args)
    except json.JSONDecodeError as e:
        logger.warning("the model's arguments for %s are not JSON (%s); kept as content", name, e)
        return None
    if not isinstance(args, dict):
        logger.warning("the model's arguments for %s are not a JSON object; kept as content", name)
        return None
    return ToolCall(name, json.dumps(args, ensure_ascii=False), f"call_{uuid.uuid4().hex[:24]}")


def split_tool_calls(text: str, tools: frozenset[str]) -> ToolSplit:
    """The whole output's content and tool calls (`tools`: the function names the request offered)."""
    start = text.find(CALLS_BEGIN)
    if start < 0:
        return ToolSplit(text, ())
    block = text[start:].split(CALLS_END, 1)[0]
    calls = []
    for match in _CALL.finditer(block):
        call = _parse_call(match.group(1), match.group(2), match.group(3), tools)
        if call is None:
            return ToolSplit(text, ())
        calls.append(call)
    if not calls:
        return ToolSplit(text, ())
    return ToolSplit(text[:start].strip(), tuple(calls))


def _held_prefix(text: str, tag: str) -> int:
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ToolCallStream:
    """The same split over a stream of text increments: content until the block opens, then each call once
    it is complete (OpenAI clients accept a call's name and arguments in one delta)."""

    def __init__(self, tools: frozenset[str]) -> None:
        self._tools = tools
        self._pending = ""
        self._in_block = False
        self._closed = False  # the block ended: what follows is not the answer
        self._raw = False  # the block is not a valid one: it and what follows are content
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content to send now, calls completed now)."""
        if self._closed:
            return "", []
        self._pending += text
        content = ""
        if not self._in_block and not self._raw:
            start = self._pending.find(CALLS_BEGIN)
            if start < 0:
                held = _held_prefix(self._pending, CALLS_BEGIN)
                content = self._pending[: len(self._pending) - held]
                self._pending = self._pending[len(content):]
                return content, []
            content, self._pending, self._in_block = self._pending[:start], self._pending[start:], True
        calls = [] if self._raw else self._complete_calls()
        if self._raw:
            content, self._pending = content + self._pending, ""
        return content, calls

    def _complete_calls(self) -> list[ToolCall]:
        done: list[ToolCall] = []
        while (match := _CALL.search(self._pending)) is not None:
            call = _parse_call(match.group(1), match.group(2), match.group(3), self._tools)
            if call is None:
                self._raw = True
                return done
            done.append(call)
            self.calls.append(call)
            self._pending = self._pending[match.end():]
        if CALLS_END in self._pending:
            self._closed, self._pending = True, ""
        return done

    def finish(self) -> str:
        """Content still held back once the output has ended: a tag prefix, or a block that never completed."""
        rest, self._pending = self._pending, ""
        return rest
