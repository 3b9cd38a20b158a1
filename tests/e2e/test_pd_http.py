"""The PD contract over HTTP: a test client playing the router, our router, and SGLang's router binary."""

from __future__ import annotations

import json
import random
import time
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from cluster import HOST, free_port, wait_healthy

PARAMS = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n\n"]


def pd_request(cluster, body: dict, decode_first: bool) -> tuple[httpx.Response, httpx.Response]:
    """What a PD router does: the same body, with bootstrap fields, to both servers at once."""
    body = body | {"bootstrap_host": HOST, "bootstrap_port": None,
                   "bootstrap_room": random.getrandbits(63)}
    if isinstance(body.get("text"), list):
        body["bootstrap_room"] = [random.getrandbits(63) for _ in body["text"]]
    urls = [cluster.decode_url, cluster.prefill_url] if decode_first else [cluster.prefill_url, cluster.decode_url]
    with ThreadPoolExecutor(2) as pool:
        futures = {url: pool.submit(httpx.post, url + "/generate", json=body, timeout=120) for url in urls}
        return futures[cluster.prefill_url].result(), futures[cluster.decode_url].result()


@pytest.mark.parametrize("decode_first", [False, True])
def test_client_as_router_equals_in_process_tpla(cluster, tpla_engine, decode_first):
    expected = [o["output_ids"] for o in tpla_engine.generate(PROMPTS, PARAMS)]
    for prompt, want in zip(PROMPTS, expected):
        prefill, decode = pd_request(cluster, {"text": prompt, "sampling_params": PARAMS}, decode_first)
        assert prefill.status_code == 200 and decode.status_code == 200, (prefill.text, decode.text)
        assert decode.json()["output_ids"] == want
    # a batch: one room per prompt
    prefill, decode = pd_request(cluster, {"text": PROMPTS, "sampling_params": PARAMS}, decode_first)
    assert [o["output_ids"] for o in decode.json()] == expected


def test_pd_streaming_and_logprobs_through_our_router(cluster, tpla_engine):
    want = tpla_engine.generate(PROMPTS[0], PARAMS)
    body = {"text": PROMPTS[0], "sampling_params": PARAMS, "stream": True}
    texts = []
    with httpx.stream("POST", cluster.url + "/generate", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                texts.append(json.loads(line[6:])["text"])
    assert texts and texts[-1] == want["text"]
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1))

    out = httpx.post(cluster.url + "/generate", timeout=120, json={
        "text": PROMPTS[0], "sampling_params": PARAMS, "return_logprob": True, "logprob_start_len": 0,
    }).json()
    meta = out["meta_info"]
    # The prompt's logprobs come from the prefill (merged by the router), the output's from the decode.
    assert len(meta["input_token_logprobs"]) == meta["prompt_tokens"]
    assert len(meta["output_token_logprobs"]) == len(out["output_ids"]) == 12


def test_openai_client_against_router_and_decode(cluster, tpla_engine):
    want = tpla_engine.generate(PROMPTS[0], PARAMS)["text"]
    for base in (cluster.url, cluster.decode_url):
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
        model = client.models.list().data[0].id
        if base == cluster.url:  # through the router: prefill + decode
            c = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True})
            assert c.choices[0].text == want and c.usage.completion_tokens == 12
        chat = client.chat.completions.create(model=model, max_tokens=8, temperature=0,
                                              messages=[{"role": "user", "content": "Write a loop."}])
        assert chat.choices[0].message.content is not None and chat.usage.completion_tokens >= 1
        stream = client.chat.completions.create(model=model, max_tokens=8, temperature=0, stream=True,
                                                messages=[{"role": "user", "content": "Write a loop."}])
        assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == \
            chat.choices[0].message.content


def test_sglang_router_binary_in_front_of_our_servers(cluster, tpla_engine):
    """SGLang's own PD router (the Rust binary) drives our prefill and decode servers."""
    want = tpla_engine.generate(PROMPTS[0], PARAMS)["text"]
    port = free_port()
    proc = subprocess.Popen([
        sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation",
        "--prefill", cluster.prefill_url, str(cluster.bootstrap_port), "--decode", cluster.decode_url,
        "--host", HOST, "--port", str(port), "--prometheus-port", str(free_port()), "--log-level", "warn",
    ])
    try:
        url = f"http://{HOST}:{port}"
        wait_healthy(url, proc, timeout=60)
        # It names the model after our servers' served_model_name (from /get_server_info), not their path.
        assert [m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]] == ["mla-tiny"]
        out = httpx.post(url + "/generate", json={"text": PROMPTS[0], "sampling_params": PARAMS}, timeout=120)
        assert out.status_code == 200, out.text
        assert out.json()["text"] == want
        texts = []
        with httpx.stream("POST", url + "/generate", timeout=120,
                          json={"text": PROMPTS[0], "sampling_params": PARAMS, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    texts.append(json.loads(line[6:])["text"])
        assert texts[-1] == want
        chat = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "model": "mla-tiny", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "Write a loop."}],
        })
        assert chat.status_code == 200, chat.text
        assert chat.json()["usage"]["completion_tokens"] >= 1
        wrong = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "model": "gpt-4", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        assert wrong.status_code == 404 and "gpt-4" in wrong.json()["error"]["message"]
    finally:
        proc.terminate()
        proc.wait(30)


def test_room_whose_prefill_never_comes_aborts_and_frees_pages(cluster):
    before = httpx.get(cluster.decode_url + "/server_info").json()["internal_states"][0]["pages_free"]
    body = {"text": PROMPTS[0], "sampling_params": PARAMS, "bootstrap_host": HOST,
            "bootstrap_port": free_port(), "bootstrap_room": random.getrandbits(63)}
    out = httpx.post(cluster.decode_url + "/generate", json=body, timeout=120)
    assert out.status_code == 503 and out.json()["error"]["type"] == "kv_transfer_failed", out.text
    streamed = httpx.post(cluster.decode_url + "/generate", json={**body, "stream": True,
                                                                   "bootstrap_room": random.getrandbits(63)},
                          timeout=120)
    assert streamed.status_code == 503 and streamed.json()["error"]["type"] == "kv_transfer_failed"
    after = httpx.get(cluster.decode_url + "/server_info").json()["internal_states"][0]["pages_free"]
    assert after == before
    ok = httpx.post(cluster.url + "/generate", json={"text": PROMPTS[0], "sampling_params": PARAMS}, timeout=120)
    assert ok.status_code == 200


def test_more_rooms_than_a_decode_server_holds_fail_that_request_not_the_server(cluster):
    """A batch of 4,100 prompts, each with its own room, passes the decode's 4,096 rooms: that request gets
    a 503 naming the limit, its rooms are given up, and the server goes on serving."""
    state = httpx.get(cluster.decode_url + "/server_info").json()["internal_states"][0]
    n = 4100
    body = {"input_ids": [[5, 6, 7]] * n, "sampling_params": {"max_new_tokens": 2},
            "bootstrap_host": [HOST] * n, "bootstrap_port": [free_port()] * n,
            "bootstrap_room": random.sample(range(1, 1 << 62), n)}
    out = httpx.post(cluster.decode_url + "/generate", json=body, timeout=300)
    assert out.status_code == 503 and "retry later" in out.json()["error"]["message"], out.text[:500]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = httpx.get(cluster.decode_url + "/server_info").json()["internal_states"][0]
        if now["pages_free"] == state["pages_free"] and now["kv_rooms_waiting"] == 0:
            break
        time.sleep(0.5)
    assert now["pages_free"] == state["pages_free"] and now["kv_rooms_waiting"] == 0
    ok = httpx.post(cluster.url + "/generate", json={"text": PROMPTS[0], "sampling_params": PARAMS}, timeout=120)
    assert ok.status_code == 200
