"""Logprobs through PD, by either router (ours and SGLang's binary) and the openai client.

The prefill computes the prompt's logprobs and samples the first output token; DONE carries both (with
their top-k) to the decode, whose answer reports every position once. The reference is the decode
server answering the same request alone (no bootstrap room: it prefills itself, exactly as the prefill
does), so values agree up to float noise and every count agrees exactly.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

PROMPT = "def fibonacci(n):"
TOP = 3
BODY = {
    "text": PROMPT,
    "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True},
    "return_logprob": True,
    "logprob_start_len": 0,
    "top_logprobs_num": TOP,
}


@pytest.fixture(scope="module")
def routers(cluster, sglang_router) -> dict[str, str]:
    return {"ours": cluster.url, "sglang-router": sglang_router}


@pytest.fixture(scope="module")
def alone(cluster) -> dict:
    """The decode server's own answer, prefilling the prompt itself."""
    r = httpx.post(cluster.decode_url + "/generate", json=BODY, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["meta_info"]


def _check(meta: dict, alone: dict) -> None:
    n_prompt = meta["prompt_tokens"]
    assert len(meta["input_token_logprobs"]) == len(meta["input_top_logprobs"]) == n_prompt
    assert meta["input_token_logprobs"][0][0] is None and meta["input_top_logprobs"][0] is None
    assert all(len(top) == TOP for top in meta["input_top_logprobs"][1:])
    assert len(meta["output_token_logprobs"]) == len(meta["output_top_logprobs"]) == 6
    assert all(top is not None and len(top) == TOP for top in meta["output_top_logprobs"])
    for key in ("input_token_logprobs", "output_token_logprobs"):
        assert [t for _, t, _ in meta[key]] == [t for _, t, _ in alone[key]]
        got = [v for v, _, _ in meta[key][1:]] if key.startswith("input") else [v for v, _, _ in meta[key]]
        want = [v for v, _, _ in alone[key][1:]] if key.startswith("input") else [v for v, _, _ in alone[key]]
        assert got == pytest.approx(want, abs=2e-3)
    first_top = [t for _, t, _ in meta["output_top_logprobs"][0]]
    assert first_top[0] == meta["output_token_logprobs"][0][1]  # greedy: the first token is its own top-1


@pytest.mark.parametrize("router", ["ours", "sglang-router"])
def test_generate_logprobs_are_complete(routers, alone, router):
    r = httpx.post(routers[router] + "/generate", json=BODY, timeout=120)
    assert r.status_code == 200, r.text
    _check(r.json()["meta_info"], alone)
    with httpx.stream("POST", routers[router] + "/generate", json={**BODY, "stream": True}, timeout=120) as s:
        events = [
            json.loads(line[6:])
            for line in s.iter_lines()
            if line.startswith("data: ") and line != "data: [DONE]"
        ]
    # Streamed chunks carry output logprobs as increments (SGLang's rule): the answer is their concatenation.
    merged = dict(events[-1]["meta_info"])
    for key in ("output_token_logprobs", "output_top_logprobs"):
        merged[key] = [entry for event in events for entry in event["meta_info"][key]]
    _check(merged, alone)


@pytest.mark.parametrize("router", ["ours", "sglang-router"])
def test_openai_top_logprobs_count_every_token(routers, router):
    client = openai.OpenAI(base_url=routers[router] + "/v1", api_key="unused", max_retries=0, timeout=120)
    completion = client.completions.create(
        model="mla-tiny",
        prompt=PROMPT,
        max_tokens=4,
        temperature=0,
        logprobs=3,
        extra_body={"ignore_eos": True},
    )
    logprobs = completion.choices[0].logprobs
    assert [len(top) for top in logprobs.top_logprobs] == [3, 3, 3, 3] and len(logprobs.token_logprobs) == 4
    chat = client.chat.completions.create(
        model="mla-tiny",
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        messages=[{"role": "user", "content": "Write a loop."}],
        extra_body={"ignore_eos": True},
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and [len(c.top_logprobs) for c in content] == [2, 2, 2, 2]
    assert content[0].top_logprobs[0].token == content[0].token


def test_constrained_first_token_logprobs_are_the_grammars(cluster):
    """The prefill samples the first token under the grammar; its top logprobs say so through PD."""
    r = httpx.post(
        cluster.url + "/generate",
        timeout=120,
        json={
            "text": "x = ",
            "sampling_params": {"regex": "[0-9]{3}", "temperature": 0},
            "return_logprob": True,
            "top_logprobs_num": 5,
            "return_text_in_logprobs": True,
        },
    )
    meta = r.json()["meta_info"]
    for top in meta["output_top_logprobs"][:-1]:  # the last token is EOS, all the grammar allows then
        allowed = [t for t in top if t[0] > -1e30]
        assert allowed and all(t[2].isdigit() for t in allowed), top
