"""reasoning_content and tool_calls end to end: a server with --chat-template deepseek-v3, --reasoning-parser
deepseek-r1 and --tool-call-parser deepseekv3 over a model whose greedy answer, in DeepSeek's tokens, is
reasoning then a tool call (deepseek_model.py), driven by the official openai client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from deepseek_model import ARGUMENTS, REASONING, write_deepseek_tool_model
from server_procs import ServerProcess

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def deepseek_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    model = write_deepseek_tool_model(tmp_path_factory.mktemp("deepseek") / "tool-model")
    server = ServerProcess(model, "--chat-template", "deepseek-v3", "--reasoning-parser", "deepseek-r1",
                           "--tool-call-parser", "deepseekv3", "--served-model-name", "deepseek-tiny")
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(deepseek_server: ServerProcess) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=deepseek_server.url + "/v1", api_key=deepseek_server.api_key, max_retries=0,
                      timeout=120)
    yield c
    c.close()


def test_the_answer_is_reasoning_and_a_tool_call(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="deepseek-tiny", messages=ASK, tools=TOOLS, temperature=0,
                                       max_tokens=32)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.model_extra["reasoning_content"] == REASONING
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == json.loads(ARGUMENTS)


def test_the_stream_carries_the_same_message(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="deepseek-tiny", messages=ASK, tools=TOOLS,
                                                 temperature=0, max_tokens=32, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    reasoning = "".join(d.model_extra.get("reasoning_content") or "" for d in deltas)
    calls = [call for d in deltas for call in d.tool_calls or []]
    assert reasoning == REASONING
    assert "".join(d.content or "" for d in deltas) == ""
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (0, "get_weather", json.loads(ARGUMENTS))]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_conversation_with_tool_results_renders_and_answers(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model="deepseek-tiny", messages=ASK, tools=TOOLS, temperature=0,
                                           max_tokens=32).choices[0].message
    call = first.tool_calls[0]
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 C"}]
    r = client.chat.completions.create(model="deepseek-tiny", messages=messages, tools=TOOLS, temperature=0,
                                       max_tokens=32)
    assert r.choices[0].finish_reason == "tool_calls"  # this model always calls its tool again
    assert r.usage.prompt_tokens > client.chat.completions.create(
        model="deepseek-tiny", messages=ASK, tools=TOOLS, temperature=0, max_tokens=1).usage.prompt_tokens


def test_the_template_writes_tools_and_deepseek_tokens(deepseek_server: ServerProcess) -> None:
    from transformers import AutoTokenizer

    from tpla_serve.server.chat_template import resolve_chat_template

    model_dir = Path(deepseek_server.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = resolve_chat_template("deepseek-v3")
    text = tokenizer.apply_chat_template(ASK, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<｜begin▁of▁sentence｜>") and text.endswith("<｜User｜>" + ASK[0]["content"]
                                                                       + "<｜Assistant｜>")
    assert '"name": "get_weather"' in text and "<｜tool▁calls▁begin｜>" in text


def test_forcing_a_tool_call_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="deepseek-tiny", messages=ASK, tools=TOOLS, tool_choice="required")
    assert e.value.body["param"] == "tool_choice" and "constrained decoding" in e.value.body["message"]
