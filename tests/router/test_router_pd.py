"""The PD contract through the real router process, against stub prefill/decode processes."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from router_procs import RouterProcess, StubWorker, Workers, router_args, wait_for

INJECTED = {"bootstrap_host", "bootstrap_port", "bootstrap_room", "rid"}


@pytest.fixture(scope="module")
def router(module_workers: Workers) -> Iterator[RouterProcess]:
    r = RouterProcess(router_args(module_workers.prefill, module_workers.decode, "--policy", "round_robin"))
    yield r
    r.stop()


def bodies(stubs: list[StubWorker]) -> list[tuple[StubWorker, dict[str, Any]]]:
    return [(s, rec["body"]) for s in stubs for rec in s.requests()]


def sse_data(lines: list[str]) -> list[Any]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: ") and line != "data: [DONE]"]


def test_bootstrap_injection_and_pairing(http: httpx.Client, router: RouterProcess, workers: Workers) -> None:
    sent = [{"text": f"prompt {i}", "sampling_params": {"max_new_tokens": 3}} for i in range(6)]
    for body in sent:
        r = http.post(router.url + "/generate", json=body)
        assert r.status_code == 200, r.text
    decoded = bodies(workers.decode)
    prefilled = {b["bootstrap_room"]: (s, b) for s, b in bodies(workers.prefill)}
    assert len(decoded) == len(prefilled) == len(sent)
    for stub, body in decoded:
        room = body["bootstrap_room"]
        assert isinstance(room, int) and 0 <= room < 2**63
        _, p_body = prefilled[room]
        assert p_body == body  # the same body went to both halves of the pair
        assert body["bootstrap_host"] == "127.0.0.1"
        assert body["bootstrap_port"] == 8998
        assert {k: v for k, v in body.items() if k not in INJECTED} in sent
    # round_robin on both sides: every worker got its share
    assert all(len(s.requests()) == 3 for s in workers.all)


def test_prefill_and_decode_receive_the_request_concurrently(http: httpx.Client, router: RouterProcess, workers: Workers) -> None:
    for p in workers.prefill:
        p.configure(hold=True)
    result: dict[str, httpx.Response] = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "r", http.post(router.url + "/generate", json={"text": "concurrent"})))
    thread.start()
    # The prefill cannot answer until released, yet the decode already has the body.
    decoded = wait_for(lambda: bodies(workers.decode), what="the decode body")
    held = wait_for(lambda: bodies(workers.prefill), what="the prefill body")
    assert len(held) == 1 and held[0][1] == decoded[0][1]
    assert "r" not in result
    for p in workers.prefill:
        p.release()
    thread.join(10)
    assert result["r"].status_code == 200


def test_logprobs_merged_prefill_first(http: httpx.Client, router: RouterProcess, workers: Workers) -> None:
    for d in workers.decode:
        d.configure(decode_logprobs=[[-0.5, 42, None]])
    r = http.post(router.url + "/generate", json={"text": "logprob me", "return_logprob": True})
    assert r.status_code == 200
    (p_stub, p_body), = bodies(workers.prefill)
    (d_stub, d_body), = bodies(workers.decode)
    direct_p = http.post(p_stub.url + "/generate", json=p_body).json()["meta_info"]["input_token_logprobs"]
    direct_d = http.post(d_stub.url + "/generate", json=d_body).json()["meta_info"]["input_token_logprobs"]
    assert direct_p and direct_d
    assert r.json()["meta_info"]["input_token_logprobs"] == direct_p + direct_d


def test_streamed_logprobs_merged_in_every_event(http: httpx.Client, router: RouterProcess, workers: Workers) -> None:
    for d in workers.decode:
        d.configure(decode_logprobs=[[-0.5, 42, None]])
    body = {"text": ["ab", "cde"], "return_logprob": True, "stream": True}
    r = http.post(router.url + "/generate", json=body)
    events = sse_data(r.text.splitlines())
    (p_stub, p_body), = bodies(workers.prefill)
    direct = http.post(p_stub.url + "/generate", json={**p_body, "stream": False}).json()
    assert len(events) == 2 * 3
    for e in events:
        expected = direct[e["index"]]["meta_info"]["input_token_logprobs"] + [[-0.5, 42, None]]
        assert e["meta_info"]["input_token_logprobs"] == expected
    assert r.text.rstrip().endswith("data: [DONE]")


def test_sse_passes_through_before_the_decode_finishes(http: httpx.Client, router: RouterProcess, workers: Workers) -> None:
    for d in workers.decode:
        d.configure(chunks=3, pause_after=1)
    with http.stream("POST", router.url + "/generate", json={"text": "stream", "stream": True}) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        # The decode stub is paused after its first event; the client already holds it.
        assert json.loads(first[6:])["meta_info"]["completion_tokens"] == 1
        for d in workers.decode:
            d.release()
        rest = list(lines)
    events = sse_data([first] + rest)
    assert [e["meta_info"]["completion_tokens"] for e in events] == [1, 2, 3]
    assert "data: [DONE]" in rest
    assert r.headers["content-type"].startswith("text/event-stream")


@pytest.mark.parametrize("body,size", [
    ({"text": ["one", "two", "three"], "sampling_params": {"max_new_tokens": 2}}, 3),
    ({"input_ids": [[1, 2, 3], [4, 5]]}, 2),
])
def test_batch_requests(http: httpx.Client, router: RouterProcess, workers: Workers, body: dict[str, Any], size: int) -> None:
    r = http.post(router.url + "/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert isinstance(out, list) and len(out) == size
    (_, d_body), = bodies(workers.decode)
    (_, p_body), = bodies(workers.prefill)
    assert p_body == d_body
    rooms = d_body["bootstrap_room"]
    assert len(rooms) == size and len(set(rooms)) == size
    assert d_body["bootstrap_host"] == ["127.0.0.1"] * size and d_body["bootstrap_port"] == [8998] * size
    assert len(d_body["rid"]) == size
    assert [o["meta_info"]["bootstrap_room"] for o in out] == rooms


def test_unknown_fields_pass_through_untouched(http: httpx.Client, router: RouterProcess, workers: Workers) -> None:
    body = {
        "text": "pass through",
        "sampling_params": {"max_new_tokens": 4, "temperature": 0.1, "future_knob": [1e-300, 2**80]},
        "lora_path": None,
        "custom_logit_processor": "{\"opaque\": true}",
        "my_extension": {"nested": {"deeper": ["ü", "日本", -0.0, 3.141592653589793]}},
        "return_hidden_states": False,
    }
    r = http.post(router.url + "/generate", json=body)
    assert r.status_code == 200
    for _, got in bodies(workers.prefill) + bodies(workers.decode):
        assert {k: v for k, v in got.items() if k not in INJECTED} == body
        assert list(got)[:len(body)] == list(body)  # order kept too


def test_openai_routes(http: httpx.Client, router: RouterProcess, workers: Workers) -> None:
    r = http.post(router.url + "/v1/completions", json={"model": "stub-model", "prompt": ["a", "b"]})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2
    r = http.post(router.url + "/v1/chat/completions",
                   json={"model": "stub-model", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"].startswith(" decode")
    r = http.post(router.url + "/v1/chat/completions", timeout=10, json={
        "model": "stub-model", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    chunks = sse_data(r.text.splitlines())
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == [" decode0", " decode1", " decode2"]
    recorded = bodies(workers.decode)
    completions = next(b for _, b in recorded if "prompt" in b)
    assert len(completions["bootstrap_room"]) == 2
    assert all(isinstance(b["bootstrap_room"], int) for _, b in recorded if "messages" in b)


def test_info_endpoints(http: httpx.Client, router: RouterProcess, workers: Workers) -> None:
    assert http.get(router.url + "/v1/models").json()["data"][0]["id"] == "stub-model"
    for path in ("/model_info", "/get_model_info"):
        assert http.get(router.url + path).json()["model_path"] == "stub-model"
    for path in ("/server_info", "/get_server_info"):
        info = http.get(router.url + path).json()
        assert sorted(e["server_info"]["port"] for e in info["prefill"]) == sorted(w.port for w in workers.prefill)
        assert sorted(e["server_info"]["port"] for e in info["decode"]) == sorted(w.port for w in workers.decode)
    r = http.post(router.url + "/flush_cache")
    assert r.status_code == 200 and all(w.flushes() == 1 for w in workers.all)
    health = http.get(router.url + "/health")
    assert health.status_code == 200 and health.json()["decode"] == {"available": 2, "total": 2}
    assert http.get(router.url + "/health_generate").status_code == 200


def test_metrics(http: httpx.Client, router: RouterProcess, workers: Workers) -> None:
    http.post(router.url + "/generate", json={"text": "count me"})
    http.post(router.url + "/generate", content=b"{broken")
    text = http.get(router.url + "/metrics").text
    assert 'tpla_router_requests_total{route="/generate"}' in text
    assert 'tpla_router_errors_total{kind="bad_request"}' in text
    assert "tpla_router_request_duration_seconds_bucket" in text
    assert "tpla_router_time_to_first_byte_seconds_bucket" in text
    for w in workers.all:
        assert f'tpla_router_worker_in_flight{{role="{w.role}",url="{w.url}"}} 0.0' in text
