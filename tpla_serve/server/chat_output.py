"""The assistant message of a chat answer: the model's text split into reasoning_content (--reasoning-parser),
content and tool_calls (--tool-call-parser), whole or as stream deltas.

Reasoning comes first (DeepSeek-R1 thinks, then answers); tool calls are read from the answer part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tpla_serve.server.reasoning_parser import ReasoningStream, split_reasoning
from tpla_serve.server.tool_call_parser import ToolCallStream, split_tool_calls


@dataclass(frozen=True)
class ChatParsing:
    """What a request asks to be parsed out of its text (None: that parser is off)."""

    reasoning: bool = False
    stream_reasoning: bool = True
    tools: frozenset[str] | None = None  # the function names the request offers

    def message(self, text: str) -> dict[str, Any]:
        """The whole answer's message fields."""
        message: dict[str, Any] = {"role": "assistant"}
        if self.reasoning:
            split = split_reasoning(text)
            message["reasoning_content"] = split.reasoning or None
            text = split.content
        if self.tools is not None:
            tools = split_tool_calls(text, self.tools)
            text = tools.content
            if tools.calls:
                message["tool_calls"] = [call.openai() for call in tools.calls]
        message["content"] = text if text or "tool_calls" not in message else None
        return message

    def stream(self) -> ChatDeltas:
        return ChatDeltas(self)


class ChatDeltas:
    """One choice's stream: each text increment becomes the deltas it completes."""

    def __init__(self, parsing: ChatParsing) -> None:
        self._reasoning = ReasoningStream(parsing.stream_reasoning) if parsing.reasoning else None
        self._tools = ToolCallStream(parsing.tools) if parsing.tools is not None else None

    @property
    def called_tools(self) -> bool:
        return self._tools is not None and bool(self._tools.calls)

    def feed(self, text: str) -> list[dict[str, Any]]:
        reasoning, content = "", text
        if self._reasoning is not None:
            split = self._reasoning.feed(text)
            reasoning, content = split.reasoning, split.content
        return self._deltas(reasoning, content, final=False)

    def finish(self) -> list[dict[str, Any]]:
        reasoning, content = "", ""
        if self._reasoning is not None:
            split = self._reasoning.finish()
            reasoning, content = split.reasoning, split.content
        return self._deltas(reasoning, content, final=True)

    def _deltas(self, reasoning: str, content: str, final: bool) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        if reasoning:
            deltas.append({"reasoning_content": reasoning})
        calls: list[Any] = []
        if self._tools is not None:
            content, calls = self._tools.feed(content)
            if final:
                content += self._tools.finish()
        if content:
            deltas.append({"content": content})
        start = len(self._tools.calls) - len(calls) if self._tools is not None else 0
        for i, call in enumerate(calls):
            deltas.append({"tool_calls": [call.openai(index=start + i)]})
        return deltas
