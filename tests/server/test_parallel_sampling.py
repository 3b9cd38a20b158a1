"""Parallel sampling (`n`): the official openai client and the native /generate against a server, and the
offline Engine. Greedy samples equal the single answer; sampled ones differ; the prompt is prefilled
once (the later samples read its pages from the prefix cache); usage counts the prompt once."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from server_procs import ServerProcess

PROMPT = "def fibonacci(n):\n    " + "a, b = b, a + b\n    " * 12  # several whole KV pages


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0, timeout=120)
    yield c
    c.close()


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_greedy_samples_equal_the_single_answer_and_the_prompt_is_prefilled_once(
    server: ServerProcess, client: openai.OpenAI, model: str
) -> None:
    server.client.post("/flush_cache")
    single = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    server.client.post("/flush_cache")
    before = server.stats()
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, n=3)
    after = server.stats()
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [single.choices[0].text] * 3
    prompt_tokens = single.usage.prompt_tokens
    assert r.usage.prompt_tokens == prompt_tokens  # the prompt counts once, as OpenAI counts it
    assert r.usage.completion_tokens == 3 * single.usage.completion_tokens
    # Two of the three samples read the prompt's whole pages from the cache instead of computing them.
    cached = after["cached_prompt_tokens"] - before["cached_prompt_tokens"]
    page = after["page_size"]
    assert cached == 2 * ((prompt_tokens - 1) // page) * page


def test_sampled_samples_differ_and_follow_their_seeds(client: openai.OpenAI, model: str) -> None:
    kw = {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "seed": 7}
    r = client.completions.create(n=4, **kw)
    texts = [c.text for c in r.choices]
    assert len(set(texts)) > 1
    assert client.completions.create(n=4, **kw).choices[0].text == texts[0]  # seeded: reproducible


def test_chat_n_streamed_and_not(client: openai.OpenAI, model: str) -> None:
    messages = [{"role": "user", "content": "import os"}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in whole.choices] == [0, 1]
    assert whole.choices[0].message.content == whole.choices[1].message.content
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=6, temperature=0, n=2, stream=True,
        stream_options={"include_usage": True},
    )
    content = {0: "", 1: ""}
    finished = set()
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            content[choice.index] += choice.delta.content or ""
            if choice.finish_reason is not None:
                finished.add(choice.index)
    assert content == {0: whole.choices[0].message.content, 1: whole.choices[1].message.content}
    assert finished == {0, 1}
    assert usage is not None and usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.prompt_tokens_details.cached_tokens is not None


def test_native_generate_answers_a_list_with_the_rids_numbered(server: ServerProcess) -> None:
    body = {"text": "import os", "rid": "sample", "sampling_params": {"n": 2, "max_new_tokens": 4,
                                                                    "temperature": 0}}
    r = server.client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert isinstance(out, list) and len(out) == 2
    assert [o["meta_info"]["id"] for o in out] == ["sample_0", "sample_1"]
    assert out[0]["text"] == out[1]["text"]
    batch = {"text": ["import os", "def f(x):"], "sampling_params": {"n": 2, "max_new_tokens": 4,
                                                                       "temperature": 0}}
    outs = server.client.post("/generate", json=batch).json()
    assert len(outs) == 4  # copy-major, as SGLang orders them: prompt 0, prompt 1, prompt 0, prompt 1
    assert outs[0]["text"] == outs[2]["text"] and outs[1]["text"] == outs[3]["text"]


def test_offline_engine_n(engine) -> None:
    single = engine.generate("import os", {"max_new_tokens": 4, "temperature": 0})
    samples = engine.generate("import os", {"max_new_tokens": 4, "temperature": 0, "n": 2})
    assert [s["text"] for s in samples] == [single["text"]] * 2
    with pytest.raises(ValueError, match="n must be an integer"):
        engine.generate("import os", {"n": 0})
