"""API key, size and token limits, and adding/removing workers at runtime, with real processes."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable

import httpx
from router_procs import RouterProcess, Workers, router_args, wait_for

StartRouter = Callable[[list[str]], RouterProcess]
KEY = {"Authorization": "Bearer sesame"}


def test_api_key_guards_every_route_but_health(http: httpx.Client, workers: Workers,
                                               start_router: StartRouter) -> None:
    router = start_router(router_args(workers.prefill, workers.decode, "--api-key", "sesame"))
    assert http.get(router.url + "/health").status_code == 200
    for method, path in [("POST", "/generate"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                         ("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/get_server_info"),
                         ("POST", "/flush_cache"), ("GET", "/list_workers"), ("POST", "/add_worker"),
                         ("POST", "/remove_worker"), ("GET", "/health_generate")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            r = http.request(method, router.url + path, json={}, headers=headers)
            assert r.status_code == 401, (method, path, headers)
            assert "API key" in r.json()["error"]["message"]
    assert all(w.requests() == [] for w in workers.all)
    r = http.post(router.url + "/generate", json={"text": "open sesame"}, headers=KEY)
    assert r.status_code == 200
    # The workers get the router's own key (the client's header itself is never forwarded).
    assert {rec["authorization"] for w in workers.all for rec in w.requests()} == {"Bearer sesame"}


def test_oversized_body_is_rejected(http: httpx.Client, workers: Workers, start_router: StartRouter) -> None:
    router = start_router(router_args(workers.prefill, workers.decode, "--max-payload-size", "2000"))
    r = http.post(router.url + "/generate", json={"text": "x" * 5000})
    assert r.status_code == 413 and "exceeds" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit must hold while reading
        for _ in range(10):
            yield b" " * 500
        yield b'{"text": "late"}'

    r = http.post(router.url + "/generate", content=chunks())
    assert r.status_code == 413 and "error" in r.json()
    assert all(w.requests() == [] for w in workers.all)
    assert http.post(router.url + "/generate", json={"text": "small"}).status_code == 200


def test_max_new_tokens_cap(http: httpx.Client, workers: Workers, start_router: StartRouter) -> None:
    router = start_router(router_args(workers.prefill, workers.decode, "--max-new-tokens-cap", "64"))
    r = http.post(router.url + "/generate", json={"text": "a", "sampling_params": {"max_new_tokens": 65}})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == \
        "sampling_params.max_new_tokens=65 exceeds this router's max_new_tokens cap of 64"
    r = http.post(router.url + "/v1/completions", json={"prompt": "a", "max_tokens": 1000})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    assert all(w.requests() == [] for w in workers.all)
    assert http.post(router.url + "/v1/chat/completions",
                     json={"messages": [{"role": "user", "content": "hi"}]}).status_code == 200
    (body,) = [rec["body"] for d in workers.decode for rec in d.requests()]
    assert body["max_tokens"] == 64


def test_admin_add_and_remove_workers(http: httpx.Client, workers: Workers, start_router: StartRouter) -> None:
    p0, p1 = workers.prefill
    d0, d1 = workers.decode
    router = start_router(router_args([p0], [d0], "--api-key", "sesame", "--policy", "round_robin",
                                      "--disable-health-check"))
    r = http.post(router.url + "/add_worker", params={"url": d1.url, "worker_type": "decode"}, headers=KEY)
    assert r.status_code == 200 and r.json()["added"]["url"] == d1.url
    r = http.post(router.url + "/add_worker", headers=KEY,
                  json={"url": p1.url, "worker_type": "prefill", "bootstrap_port": 9100})
    assert r.status_code == 200
    for _ in range(4):
        assert http.post(router.url + "/generate", json={"text": "spread"}, headers=KEY).status_code == 200
    assert all(len(w.requests()) == 2 for w in workers.all)
    assert {rec["body"]["bootstrap_port"] for rec in p1.requests()} == {9100}

    # A held request on d0 survives d0's removal and completes.
    for w in workers.all:
        w.reset()
    d0.configure(hold=True)
    result: dict[str, httpx.Response] = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "r", http.post(router.url + "/generate", json={"text": "in flight"}, headers=KEY)))
    thread.start()
    wait_for(lambda: len(d0.requests()) == 1, what="the request to reach d0")
    r = http.post(router.url + "/remove_worker", params={"url": d0.url}, headers=KEY)
    assert r.status_code == 200 and r.json()["removed"]["in_flight"] == 1
    for _ in range(3):
        assert http.post(router.url + "/generate", json={"text": "after"}, headers=KEY).status_code == 200
    assert len(d1.requests()) == 3 and len(d0.requests()) == 1
    d0.release()
    thread.join(10)
    assert result["r"].status_code == 200 and result["r"].json()["meta_info"]["served_by"].endswith(str(d0.port))
    listing = http.get(router.url + "/list_workers", headers=KEY).json()
    assert [w["url"] for w in listing["decode"]] == [d1.url]

    assert http.post(router.url + "/add_worker", headers=KEY,
                     params={"url": d1.url, "worker_type": "decode"}).status_code == 409
    assert http.post(router.url + "/remove_worker", headers=KEY, params={"url": d0.url}).status_code == 404
    assert http.post(router.url + "/add_worker", headers=KEY,
                     params={"url": d1.url, "worker_type": "middle"}).status_code == 400
    r = http.post(router.url + "/add_worker", headers=KEY, params={"url": "http://127.0.0.1:9", "worker_type": "decode"})
    assert r.status_code == 503 and "health check" in r.json()["error"]["message"]


def test_no_workers_is_a_clear_503(http: httpx.Client, start_router: StartRouter) -> None:
    router = start_router([])
    assert http.get(router.url + "/health").status_code == 503
    r = http.post(router.url + "/generate", json={"text": "anyone?"})
    assert r.status_code == 503 and r.json()["error"]["message"] == "no available prefill worker"


def test_cli_rejects_bad_flags() -> None:
    r = subprocess.run([sys.executable, "-m", "tpla_router", "--prefill", "http://127.0.0.1:1", "port"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and "bootstrap port must be a number" in r.stderr
    r = subprocess.run([sys.executable, "-m", "tpla_router", "--decode", "127.0.0.1:1"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and "worker url" in r.stderr
