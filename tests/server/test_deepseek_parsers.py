"""--reasoning-parser deepseek-r1 and --tool-call-parser deepseekv3 on text in DeepSeek's formats, as
DeepSeek-R1 (with and without its opening tag) and DeepSeek-V3 write it; streamed in every chunking, the
deltas add up to the whole answer's message."""

from __future__ import annotations

import json
import random

import pytest

from tpla_serve.server.chat_output import ChatParsing
from tpla_serve.server.reasoning_parser import ReasoningStream, split_reasoning
from tpla_serve.server.tool_call_parser import split_tool_calls

R1 = "Okay, the user asks what 2 + 2 is. That is basic arithmetic.\n</think>\n\nThe answer is **4**."
R1_0528 = "<think>\nLet me recall the capital of France.\n</think>\n\nParis."
R1_CUT = "<think>\nThe user wants a long proof, step one: assume"  # stopped by max_tokens while thinking
V3_CALLS = (
    "Let me check both cities.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_current_weather\n"
    '```json\n{"location": "Tokyo"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>'
    'get_current_weather\n```json\n{"location": "Paris", "unit": "celsius"}\n```<｜tool▁call▁end｜>'
    "<｜tool▁calls▁end｜><｜end▁of▁sentence｜>"
)
R1_THEN_CALL = (
    "The user wants the weather; I have a tool for that.\n</think>\n\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>"
    'function<｜tool▁sep｜>get_current_weather\n```json\n{"location": "Berlin"}\n```<｜tool▁call▁end｜>'
    "<｜tool▁calls▁end｜>"
)
TOOLS = frozenset({"get_current_weather"})


def test_r1_reasoning_is_split_from_the_answer() -> None:
    assert split_reasoning(R1).reasoning == "Okay, the user asks what 2 + 2 is. That is basic arithmetic.\n"
    assert split_reasoning(R1).content == "\n\nThe answer is **4**."
    assert split_reasoning(R1_0528).reasoning == "\nLet me recall the capital of France.\n"
    assert split_reasoning(R1_0528).content == "\n\nParis."
    assert split_reasoning(R1_CUT) == split_reasoning(R1_CUT[len("<think>"):])
    assert split_reasoning(R1_CUT).content == ""


def test_v3_tool_calls_become_openai_tool_calls() -> None:
    split = split_tool_calls(V3_CALLS, TOOLS)
    assert split.content == "Let me check both cities."
    assert [(c.name, json.loads(c.arguments)) for c in split.calls] == [
        ("get_current_weather", {"location": "Tokyo"}),
        ("get_current_weather", {"location": "Paris", "unit": "celsius"})]
    assert len({c.id for c in split.calls}) == 2 and all(c.id.startswith("call_") for c in split.calls)
    assert split.calls[0].openai(0) == {"index": 0, "id": split.calls[0].id, "type": "function",
                                        "function": {"name": "get_current_weather",
                                                     "arguments": '{"location": "Tokyo"}'}}


@pytest.mark.parametrize("text", [
    V3_CALLS.replace("get_current_weather", "delete_everything"),  # a function the request did not offer
    V3_CALLS.replace('{"location": "Tokyo"}', '{"location": '),  # arguments that are not JSON
    V3_CALLS.replace('{"location": "Tokyo"}', '["Tokyo"]'),  # not an object
], ids=["unknown-function", "bad-json", "not-an-object"])
def test_a_block_that_does_not_parse_stays_content(text: str) -> None:
    assert split_tool_calls(text, TOOLS).calls == ()
    assert split_tool_calls(text, TOOLS).content == text
    message = ChatParsing(tools=TOOLS).message(text)
    assert "tool_calls" not in message and message["content"] == text


def test_text_without_a_block_is_content() -> None:
    assert split_tool_calls("Just an answer, no tools.", TOOLS).content == "Just an answer, no tools."


def test_reasoning_then_a_call_is_one_message() -> None:
    message = ChatParsing(reasoning=True, tools=TOOLS).message(R1_THEN_CALL)
    assert message["reasoning_content"] == "The user wants the weather; I have a tool for that.\n"
    assert message["content"] is None
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_current_weather"]


def _chunkings(text: str, rng: random.Random) -> list[list[str]]:
    """Every token-sized piece, single characters, and random cuts."""
    singles = list(text)
    cuts = []
    for _ in range(20):
        points = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
        cuts.append([text[a:b] for a, b in zip([0, *points], [*points, len(text)])])
    return [[text], singles, *cuts]


def _streamed(parsing: ChatParsing, pieces: list[str]) -> dict:
    deltas = parsing.stream()
    out: dict = {"reasoning_content": "", "content": "", "tool_calls": []}
    for delta in [d for piece in pieces for d in deltas.feed(piece)] + deltas.finish():
        for key in ("reasoning_content", "content"):
            out[key] += delta.get(key, "")
        out["tool_calls"] += delta.get("tool_calls", [])
    return out


@pytest.mark.parametrize("text", [R1, R1_0528, R1_CUT, V3_CALLS, R1_THEN_CALL, "plain <th text"],
                         ids=["r1", "r1-0528", "r1-cut", "v3-calls", "r1-then-call", "plain"])
def test_streamed_deltas_add_up_to_the_message(text: str) -> None:
    rng = random.Random(7)
    reasoning = text not in (V3_CALLS,)
    parsing = ChatParsing(reasoning=reasoning, tools=TOOLS)
    whole = parsing.message(text)
    for pieces in _chunkings(text, rng):
        got = _streamed(parsing, pieces)
        assert got["reasoning_content"] == (whole.get("reasoning_content") or ""), pieces
        assert got["content"].strip() == (whole["content"] or "").strip(), pieces
        assert [(c["index"], c["function"]) for c in got["tool_calls"]] == [
            (i, c["function"]) for i, c in enumerate(whole.get("tool_calls", []))], pieces


def test_stream_reasoning_false_sends_the_reasoning_in_one_piece() -> None:
    stream = ReasoningStream(stream_reasoning=False)
    pieces = [stream.feed(c) for c in R1]
    reasoning = [p.reasoning for p in pieces if p.reasoning]
    assert reasoning == [split_reasoning(R1).reasoning]
