"""DeepSeek-R1's reasoning format (SGLang's `--reasoning-parser deepseek-r1`): `(<think>)*reasoning</think>answer`.

DeepSeek-R1's chat template opens the think block in the prompt, so the output starts inside it (R1-0528
repeats the `<think>` tag): everything before `</think>` is `reasoning_content`, the rest `content`. An
output that never closes the block is all reasoning (it was cut off while thinking).
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_START = "<think>"
THINK_END = "</think>"


@dataclass(frozen=True)
class ReasoningSplit:
    reasoning: str
    content: str


def _strip_starts(text: str) -> str:
    while text.startswith(THINK_START):
        text = text[len(THINK_START):]
    return text


def split_reasoning(text: str) -> ReasoningSplit:
    """The whole output's reasoning and answer."""
    body = _strip_starts(text)
    reasoning, closed, content = body.partition(THINK_END)
    return ReasoningSplit(reasoning, content if closed else "")


def _held_prefix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (it may become the tag)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningStream:
    """The same split over a stream of text increments.

    A tail that may still become a tag is held back until the next increment decides it. With
    stream_reasoning=False the reasoning is sent in one piece when its block closes (SGLang's option).
    """

    def __init__(self, stream_reasoning: bool = True) -> None:
        self._stream_reasoning = stream_reasoning
        self._pending = ""  # text received but not yet classified
        self._reasoning = ""  # reasoning held back (stream_reasoning=False)
        self._in_reasoning = True
        self._at_start = True  # leading <think> tags are still dropped

    def feed(self, text: str) -> ReasoningSplit:
        self._pending += text
        if not self._in_reasoning:
            content, self._pending = self._pending, ""
            return ReasoningSplit("", content)
        if self._at_start:
            stripped = _strip_starts(self._pending)
            if stripped and THINK_START.startswith(stripped) or not stripped:
                self._pending = stripped
                return ReasoningSplit("", "")  # still possibly a <think> tag
            self._pending, self._at_start = stripped, False
        reasoning, closed, content = self._pending.partition(THINK_END)
        if closed:
            self._in_reasoning, self._pending = False, ""
            return ReasoningSplit(self._emit(reasoning, closing=True), content)
        held = _held_prefix(reasoning, THINK_END)
        self._pending = reasoning[len(reasoning) - held:]
        return ReasoningSplit(self._emit(reasoning[: len(reasoning) - held], closing=False), "")

    def finish(self) -> ReasoningSplit:
        """What is still held back once the output has ended."""
        rest, self._pending = self._pending, ""
        if self._in_reasoning:
            return ReasoningSplit(self._emit(rest, closing=True), "")
        return ReasoningSplit("", rest)

    def _emit(self, reasoning: str, closing: bool) -> str:
        if self._stream_reasoning:
            return reasoning
        self._reasoning += reasoning
        if not closing:
            return ""
        out, self._reasoning = self._reasoning, ""
        return out
