"""Parallel sampling (`n`) through PD, by either router (ours and SGLang's binary) and the openai client.

sglang-router sends a chat request with n > 1 as a batch of n bootstrap rooms for its one prompt; our
router and /generate send one room, which both servers number room, room + 1, ... (SGLang's rule). Either
way the prefill server computes the prompt once (its later samples read it from the prefix cache) and
streams each sample's KV to its room; greedy samples equal the single greedy answer.
"""

from __future__ import annotations

import httpx
import openai
import pytest

MESSAGES = [{"role": "user", "content": "Write a loop."}]


@pytest.fixture(scope="module")
def routers(cluster, sglang_router) -> dict[str, str]:
    return {"ours": cluster.url, "sglang-router": sglang_router}


@pytest.mark.parametrize("router", ["ours", "sglang-router"])
def test_chat_n_through_pd(routers, router):
    client = openai.OpenAI(base_url=routers[router] + "/v1", api_key="unused", max_retries=0, timeout=120)
    kw = {"model": "mla-tiny", "messages": MESSAGES, "max_tokens": 6, "temperature": 0}
    single = client.chat.completions.create(**kw)
    samples = client.chat.completions.create(n=2, **kw)
    assert [c.index for c in samples.choices] == [0, 1]
    assert [c.message.content for c in samples.choices] == [single.choices[0].message.content] * 2
    sampled = client.chat.completions.create(n=3, seed=5, **{**kw, "temperature": 1.0, "max_tokens": 12})
    assert len({c.message.content for c in sampled.choices}) > 1


def _prefill_stats(cluster) -> dict:
    return httpx.get(cluster.prefill_url + "/server_info", timeout=30).json()["internal_states"][0]


@pytest.mark.parametrize("router", ["ours", "sglang-router"])
def test_generate_n_through_pd_prefills_once(cluster, routers, router):
    prompt = "def fibonacci(n):\n    " + "a, b = b, a + b\n    " * 12  # several whole KV pages
    body = {"text": prompt, "sampling_params": {"max_new_tokens": 5, "temperature": 0}}
    httpx.post(cluster.prefill_url + "/flush_cache", timeout=30)
    single = httpx.post(routers[router] + "/generate", json=body, timeout=120).json()
    httpx.post(cluster.prefill_url + "/flush_cache", timeout=30)
    before = _prefill_stats(cluster)
    samples = httpx.post(
        routers[router] + "/generate", json={**body, "sampling_params": {**body["sampling_params"], "n": 3}},
        timeout=120,
    )
    assert samples.status_code == 200, samples.text
    assert [o["text"] for o in samples.json()] == [single["text"]] * 3
    after = _prefill_stats(cluster)
    # the prefill computed the prompt once: two of the three samples read its whole pages from the cache
    prompt_tokens, page = single["meta_info"]["prompt_tokens"], after["page_size"]
    assert after["cached_prompt_tokens"] - before["cached_prompt_tokens"] == 2 * ((prompt_tokens - 1) // page) * page
