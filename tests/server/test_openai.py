"""The official `openai` client against /v1: completions and chat, streamed or not, usage, logprobs, seed, echo;
OpenAI's errors for unknown models, invalid roles and tools the server cannot parse."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from server_procs import ServerProcess

PROMPT = "def fibonacci(n):"
MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "import os"}]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0, timeout=120)
    yield c
    c.close()


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    models = client.models.list().data
    assert len(models) == 1
    return models[0].id


def chat_ids(engine) -> list[int]:
    """The prompt the chat template makes, tokenized by transformers itself."""
    enc = engine.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    return list(enc["input_ids"])


def test_completion_equals_engine_with_usage(client: openai.OpenAI, model: str, engine) -> None:
    ref = engine.generate(PROMPT, {"max_new_tokens": 10, "temperature": 0.0})
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text == ref["text"]
    assert r.choices[0].finish_reason == ref["meta_info"]["finish_reason"]["type"]
    assert r.usage.prompt_tokens == ref["meta_info"]["prompt_tokens"]
    assert r.usage.completion_tokens == ref["meta_info"]["completion_tokens"]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_batch_and_logprobs(client: openai.OpenAI, model: str, engine) -> None:
    prompts = [PROMPT, "The quick brown fox"]
    refs = engine.generate(prompts, {"max_new_tokens": 6, "temperature": 0.0}, return_logprob=True,
                           top_logprobs_num=2, return_text_in_logprobs=True)
    r = client.completions.create(model=model, prompt=prompts, max_tokens=6, temperature=0, logprobs=2)
    assert [c.index for c in r.choices] == [0, 1]
    for choice, ref in zip(r.choices, refs):
        assert choice.text == ref["text"]
        want = ref["meta_info"]["output_token_logprobs"]
        assert choice.logprobs.tokens == [w[2] for w in want]
        assert choice.logprobs.token_logprobs == pytest.approx([w[0] for w in want], abs=1e-4)
        assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    assert r.usage.completion_tokens == sum(ref["meta_info"]["completion_tokens"] for ref in refs)


def test_completion_stream_with_usage(client: openai.OpenAI, model: str, engine) -> None:
    ref = engine.generate(PROMPT, {"max_new_tokens": 10, "temperature": 0.0})
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == ref["text"]
    assert text_chunks[-1].choices[0].finish_reason == ref["meta_info"]["finish_reason"]["type"]
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].usage.completion_tokens == ref["meta_info"]["completion_tokens"]
    assert chunks[-1].usage.prompt_tokens == ref["meta_info"]["prompt_tokens"]


def test_chat_equals_engine_on_the_templated_prompt(client: openai.OpenAI, model: str, engine) -> None:
    ids = chat_ids(engine)
    ref = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 8, "temperature": 0.0},
                          return_logprob=True, top_logprobs_num=2, return_text_in_logprobs=True)
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=2)
    assert r.object == "chat.completion"
    msg = r.choices[0].message
    assert msg.role == "assistant"
    assert msg.content == ref["text"]
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == ref["meta_info"]["completion_tokens"]
    want = ref["meta_info"]["output_token_logprobs"]
    got = r.choices[0].logprobs.content
    assert [t.token for t in got] == [w[2] for w in want]
    assert [t.logprob for t in got] == pytest.approx([w[0] for w in want], abs=1e-4)
    assert all(len(t.top_logprobs) == 2 for t in got)


def test_chat_stream_with_usage(client: openai.OpenAI, model: str, engine) -> None:
    greedy = {"max_new_tokens": 8, "temperature": 0.0}
    ref = engine.generate(input_ids=chat_ids(engine), sampling_params=greedy)
    chunks = list(client.chat.completions.create(
        model=model, messages=MESSAGES, max_completion_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    deltas = [c for c in chunks if c.choices]
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in deltas) == ref["text"]
    assert deltas[-1].choices[0].finish_reason == ref["meta_info"]["finish_reason"]["type"]
    assert chunks[-1].usage.completion_tokens == ref["meta_info"]["completion_tokens"]


def test_seed_reaches_the_sampler(client: openai.OpenAI, model: str, engine) -> None:
    """OpenAI `seed` is SGLang's sampling_seed: the same draw as the engine's with that seed."""
    params = {"max_new_tokens": 10, "temperature": 1.0, "sampling_seed": 1234}
    ref = engine.generate(PROMPT, params)
    other = engine.generate(PROMPT, {**params, "sampling_seed": 99})
    assert ref["output_ids"] != other["output_ids"]  # the seed matters for this prompt
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=1234)
    assert r.choices[0].text == ref["text"]


def test_stop_string_ends_the_completion(client: openai.OpenAI, model: str, engine) -> None:
    params = {"max_new_tokens": 16, "temperature": 0.0, "ignore_eos": True}
    full = engine.generate(PROMPT, params)["text"]
    stop = full[len(full) // 2:][:2]
    assert stop.strip() and stop in full
    ref = engine.generate(PROMPT, {**params, "stop": [stop]})
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == ref["text"] == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_an_unknown_model_is_404_model_not_found(client: openai.OpenAI, model: str) -> None:
    for call in (lambda: client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2),
                 lambda: client.chat.completions.create(model="gpt-4", messages=MESSAGES, max_tokens=2),
                 lambda: client.models.retrieve("gpt-4")):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.code == "model_not_found" and e.value.param == "model"
        assert e.value.type == "invalid_request_error" and model in e.value.message
    card = client.models.retrieve(model)
    assert card.id == model and card.object == "model"


def test_errors_have_openais_shape(server: ServerProcess) -> None:
    r = server.client.post("/v1/completions", json={"model": "nope", "prompt": "a"})
    assert r.status_code == 404
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = server.client.post("/v1/completions", json={"prompt": "a", "max_tokens": "many"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["code"] == 400


@pytest.mark.parametrize("role", ["wizard", "", "USER"])
def test_an_invalid_chat_role_is_400(client: openai.OpenAI, model: str, role: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=[{"role": role, "content": "hi"}], max_tokens=2)
    assert e.value.param == "messages[0].role" and "'user'" in e.value.message


def test_tools_without_a_parser_are_refused(client: openai.OpenAI, model: str) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=MESSAGES, tools=tools, max_tokens=2)
    assert e.value.param == "tools" and "--tool-call-parser" in e.value.message


def test_echo_returns_the_prompt_and_its_logprobs(client: openai.OpenAI, model: str, engine) -> None:
    ref = engine.generate(PROMPT, {"max_new_tokens": 4, "temperature": 0.0}, return_logprob=True,
                          logprob_start_len=0, top_logprobs_num=1, return_text_in_logprobs=True)
    meta = ref["meta_info"]
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, logprobs=1)
    choice = r.choices[0]
    assert choice.text == PROMPT + ref["text"]
    prompt_entries, output_entries = meta["input_token_logprobs"], meta["output_token_logprobs"]
    assert choice.logprobs.tokens == [e[2] for e in prompt_entries + output_entries]
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(
        [e[0] for e in (prompt_entries + output_entries)[1:]], abs=1e-4)
    offsets = choice.logprobs.text_offset
    assert offsets == sorted(offsets) and offsets[len(prompt_entries)] == len(PROMPT)
    for token, offset in zip(choice.logprobs.tokens, offsets):  # each shown token sits where its text is
        assert choice.text.startswith(token, offset) or token not in choice.text
    assert r.usage.prompt_tokens == meta["prompt_tokens"]

    plain = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    assert plain.choices[0].text == PROMPT + ref["text"] and plain.choices[0].logprobs is None
    streamed = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0, echo=True,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == PROMPT + ref["text"]
    scored = client.completions.create(model=model, prompt=PROMPT, max_tokens=0, echo=True, logprobs=0)
    assert scored.choices[0].text == PROMPT and len(scored.choices[0].logprobs.tokens) == meta["prompt_tokens"]
