"""/abort_request and client disconnects end requests, and every KV page comes back."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from server_procs import ServerProcess

LONG = 1000  # more tokens than the test could wait for: only an abort ends these requests early


def long_body(**extra) -> dict:
    return {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": LONG, "ignore_eos": True}, **extra}


def wait_running(server: ServerProcess, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while server.stats()["num_running"] < n:
        assert time.monotonic() < deadline, "the requests never started"
        time.sleep(0.05)


@pytest.fixture
def baseline(server: ServerProcess) -> dict:
    first = server.stats()
    stats = server.wait_idle(first["pages_free"] + first["pages_used"])
    assert stats["num_running"] == 0 and stats["pages_used"] == 0
    return stats


def assert_back_to(server: ServerProcess, baseline: dict, max_new_tokens: int) -> None:
    stats = server.wait_idle(baseline["pages_free"])
    assert stats["pages_free"] == baseline["pages_free"]
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert stats["generated_tokens"] - baseline["generated_tokens"] < max_new_tokens


def test_abort_request_ends_a_request_and_frees_its_pages(server: ServerProcess, baseline: dict) -> None:
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(r=server.client.post("/generate",
                                                                                json=long_body(rid="victim"))))
    worker.start()
    wait_running(server, 1)
    assert server.stats()["pages_used"] > 0
    r = server.client.post("/abort_request", json={"rid": "victim"})
    assert r.status_code == 200 and r.json()["aborted"] == ["victim"]
    worker.join(60)
    out = result["r"]
    assert out.status_code == 200
    assert out.json()["meta_info"]["finish_reason"]["type"] == "abort"
    assert out.json()["meta_info"]["completion_tokens"] < LONG
    assert_back_to(server, baseline, LONG)


def test_abort_by_a_batch_rid_ends_every_item(server: ServerProcess, baseline: dict) -> None:
    result: dict = {}
    body = long_body(rid="group")
    body["input_ids"] = [[5, 6, 7], [8, 9]]
    worker = threading.Thread(target=lambda: result.update(r=server.client.post("/generate", json=body)))
    worker.start()
    wait_running(server, 2)
    assert sorted(server.client.post("/abort_request", json={"rid": "group"}).json()["aborted"]) == [
        "group_0", "group_1"]
    worker.join(60)
    assert [o["meta_info"]["finish_reason"]["type"] for o in result["r"].json()] == ["abort", "abort"]
    assert_back_to(server, baseline, 2 * LONG)


def test_client_disconnect_aborts_a_request(server: ServerProcess, baseline: dict) -> None:
    with httpx.Client(base_url=server.url, headers=server.headers) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post("/generate", json=long_body(), timeout=httpx.Timeout(30, read=1.0))
    assert_back_to(server, baseline, LONG)


def test_closing_a_stream_aborts_its_request(server: ServerProcess, baseline: dict) -> None:
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as client:
        with client.stream("POST", "/generate", json=long_body(stream=True)) as r:
            assert r.status_code == 200
            events = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
                    if len(events) == 3:
                        break
    assert len(events) == 3
    assert_back_to(server, baseline, LONG)
