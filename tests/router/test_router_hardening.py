"""Hardening, with real processes: admin access, body limits, hostile JSON, failed KV transfers, fast
health checks, and where the API key may come from and where it must never show."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from router_procs import HOST, RouterProcess, StubWorker, Workers, router_args, wait_for

StartRouter = Callable[..., RouterProcess]
NO_HEALTH = ["--disable-health-check", "--retry-initial-backoff-ms", "1"]


def listing(http: httpx.Client, router: RouterProcess, headers: dict[str, str] | None = None) -> dict[str, Any]:
    return http.get(router.url + "/list_workers", headers=headers).json()


def in_flight(http: httpx.Client, router: RouterProcess, headers: dict[str, str] | None = None) -> list[int]:
    return [w["in_flight"] for ws in listing(http, router, headers).values() for w in ws]


def raw_exchange(port: int, head: bytes, body_parts: list[bytes] = ()) -> tuple[int, dict[bytes, bytes], Any]:
    """Send a hand-made request; return the answer's status, headers and JSON body."""
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.sendall(head)
        for part in body_parts:
            try:
                s.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break  # the router answered and stopped reading: what the test is after
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        head_bytes, _, body = data.partition(b"\r\n\r\n")
        lines = head_bytes.split(b"\r\n")
        headers = dict(line.lower().split(b": ", 1) for line in lines[1:])
        while len(body) < int(headers[b"content-length"]):
            body += s.recv(65536)
    return int(lines[0].split(b" ", 2)[1]), headers, json.loads(body)


def peak_rss_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


# ---- 5: admin routes and the client's credentials ----------------------------------------------

def test_admin_routes_are_off_beyond_loopback_without_a_key_and_client_credentials_stay_at_the_router(
        http: httpx.Client, workers: Workers, start_router: StartRouter) -> None:
    p0, p1 = workers.prefill
    d0, d1 = workers.decode
    # Listening on every interface, no key: admin routes answer 403 (this test reaches it over loopback).
    router = start_router(router_args([p0], [d0], "--host", "0.0.0.0", *NO_HEALTH))
    for path, params in (("/add_worker", {"url": d1.url, "worker_type": "decode"}), ("/remove_worker", {"url": d0.url})):
        r = http.post(router.url + path, params=params)
        assert r.status_code == 403 and "--enable-admin" in r.json()["error"]["message"], r.text
    assert [w["url"] for w in listing(http, router)["decode"]] == [d0.url]
    # Generation is unaffected, and the client's Authorization header never reaches a worker.
    r = http.post(router.url + "/generate", json={"text": "hi"}, headers={"Authorization": "Bearer client-secret"})
    assert r.status_code == 200
    assert {rec["authorization"] for w in (p0, d0) for rec in w.requests()} == {None}

    # With a key, workers get the router's own key.
    for w in workers.all:
        w.reset()
    keyed = start_router(router_args([p0], [d0], "--host", "0.0.0.0", *NO_HEALTH), env={"TPLA_API_KEY": "sesame"})
    r = http.post(keyed.url + "/generate", json={"text": "hi"}, headers={"Authorization": "Bearer sesame"})
    assert r.status_code == 200
    assert {rec["authorization"] for w in (p0, d0) for rec in w.requests()} == {"Bearer sesame"}
    r = http.post(keyed.url + "/add_worker", params={"url": d1.url, "worker_type": "decode"},
                  headers={"Authorization": "Bearer sesame"})
    assert r.status_code == 200

    # --enable-admin opens them without a key; a loopback-only router serves them as before.
    opened = start_router(router_args([p0], [d0], "--host", "0.0.0.0", "--enable-admin", *NO_HEALTH))
    local = start_router(router_args([p0], [d0], *NO_HEALTH))
    for r_ in (opened, local):
        r = http.post(r_.url + "/add_worker", params={"url": p1.url, "worker_type": "prefill"})
        assert r.status_code == 200, r.text
        assert [w["url"] for w in listing(http, r_)["prefill"]] == [p0.url, p1.url]


# ---- 6: body limits ------------------------------------------------------------------------------

def test_bodies_are_limited_before_they_are_read(http: httpx.Client, workers: Workers,
                                                 start_router: StartRouter) -> None:
    for w in workers.all:
        w.configure(record=False)
    router = start_router(router_args(workers.prefill, workers.decode, *NO_HEALTH))  # the default limit
    limit = 32 << 20
    # A head announcing one byte over 32 MiB is answered at once: no body byte was ever sent.
    status, headers, body = raw_exchange(router.port, b"POST /generate HTTP/1.1\r\nHost: r\r\nContent-Type: "
                                                      b"application/json\r\nContent-Length: %d\r\n\r\n" % (limit + 1))
    assert status == 413 and f"exceeds the limit of {limit} bytes" in body["error"]["message"]
    assert headers[b"connection"] == b"close"
    # A chunked body is cut off as soon as it grows past the limit (the rest is never buffered).
    chunk = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))
    status, _, body = raw_exchange(router.port, b"POST /generate HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked"
                                                b"\r\n\r\n", [chunk] * 40 + [b"0\r\n\r\n"])
    assert status == 413 and "exceeds the limit" in body["error"]["message"]
    # So is a head that never ends (httptools would gather a header's pieces without bound).
    status, _, body = raw_exchange(router.port, b"GET /health HTTP/1.1\r\nHost: r\r\nX-Big: ", [b"a" * 32768] * 8)
    assert status == 431 and "request head larger than" in body["error"]["message"]

    # Large bodies under the limit pass through without the router holding many copies of them.
    before = peak_rss_mib(router.proc.pid)
    size = 16 << 20
    big = json.dumps({"text": "a" * size, "sampling_params": {"max_new_tokens": 1}}).encode()
    results: list[int] = []

    def send() -> None:
        with httpx.Client(timeout=60) as c:
            results.append(c.post(router.url + "/generate", content=big,
                                  headers={"Content-Type": "application/json"}).status_code)

    threads = [threading.Thread(target=send) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200, 200, 200]
    growth = peak_rss_mib(router.proc.pid) - before
    assert growth < 4 * 3 * size >> 20, f"peak RSS grew by {growth} MiB for 3 bodies of {size >> 20} MiB"
    assert in_flight(http, router) == [0, 0, 0, 0]


# ---- 7: hostile JSON -----------------------------------------------------------------------------

def test_lone_surrogates_and_deep_nesting_are_400s_with_counters_intact(
        http: httpx.Client, workers: Workers, start_router: StartRouter) -> None:
    router = start_router(router_args(workers.prefill, workers.decode, "--policy", "power_of_two", *NO_HEALTH))
    bodies = [
        (b"/generate", b'{"text": "\\ud800"}'),
        (b"/generate", b'{"text": "ok", "sampling_params": {"stop": ["\\udfff x"]}, "stream": true}'),
        (b"/generate", b'{"text": "\xed\xa0\x80"}'),  # a surrogate encoded straight into the bytes
        (b"/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud83d"}]}'),
        (b"/generate", b'{"text": "x", "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        (b"/v1/completions", b'{"prompt": "x", "deep": ' + b'{"a":' * 100_000 + b"1" + b"}" * 100_000 + b"}"),
    ]
    for path, body in bodies:
        r = http.post(router.url + path.decode(), content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (body[:60], r.status_code, r.text[:200])
        assert "not valid JSON" in r.json()["error"]["message"]
    assert all(w.requests() == [] for w in workers.all)
    assert in_flight(http, router) == [0, 0, 0, 0]
    # A proper surrogate pair is fine, and passes through byte for byte.
    r = http.post(router.url + "/generate", content=b'{"text": "\\ud83d\\ude00"}',
                  headers={"Content-Type": "application/json"})
    assert r.status_code == 200
    assert {rec["body"]["text"] for w in workers.all for rec in w.requests()} == {"\U0001F600"}
    assert in_flight(http, router) == [0, 0, 0, 0]


# ---- 8: failed KV transfers and dead workers -------------------------------------------------------

def test_failed_kv_transfer_is_retried_on_another_pair(http: httpx.Client, workers: Workers,
                                                      start_router: StartRouter) -> None:
    router = start_router(router_args(workers.prefill, workers.decode, "--policy", "round_robin", *NO_HEALTH,
                                      "--retry-max-retries", "3"))
    d0, d1 = workers.decode
    for mode in ({"kv_fail": True}, {"abort_empty": True}):
        for stream in (False, True):
            for w in workers.all:
                w.reset()
            d0.configure(**mode)
            r = http.post(router.url + "/generate", json={"text": f"kv {mode} {stream}", "stream": stream})
            assert r.status_code == 200, r.text
            rooms = {rec["body"]["bootstrap_room"] for d in workers.decode for rec in d.requests()}
            assert len(d0.requests()) == 1 and len(d1.requests()) == 1 and len(rooms) == 2
            if stream:
                events = [json.loads(line[6:]) for line in r.text.splitlines()
                          if line.startswith("data: ") and line != "data: [DONE]"]
                assert [e["meta_info"]["served_by"] for e in events] == [f"decode:{d1.port}"] * 3
            else:
                assert r.json()["meta_info"]["served_by"] == f"decode:{d1.port}"
            failed_rid = d0.requests()[0]["body"]["rid"]
            wait_for(lambda rid=failed_rid: {"rid": rid} in d0.aborts(), what="abort of the failed attempt")
    assert 'tpla_router_errors_total{kind="kv_transfer_failed"} 2.0' in http.get(router.url + "/metrics").text

    # Every pair failing: a 503 of type kv_transfer_failed, or for a stream an error event and [DONE].
    for d in workers.decode:
        d.configure(kv_fail=True)
    r = http.post(router.url + "/generate", json={"text": "doomed"})
    assert r.status_code == 503
    error = r.json()["error"]
    assert error["type"] == "kv_transfer_failed" and "gave up after 3 attempts" in error["message"]
    r = http.post(router.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                             "stream": True})
    assert r.status_code == 200
    lines = [line for line in r.text.splitlines() if line]
    assert lines[-1] == "data: [DONE]" and len(lines) == 2
    error = json.loads(lines[0][6:])["error"]
    assert error["type"] == "kv_transfer_failed" and error["code"] == 503
    assert in_flight(http, router) == [0, 0, 0, 0]


def test_dead_worker_leaves_rotation_with_default_health_settings(
        http: httpx.Client, workers: Workers, start_router: StartRouter) -> None:
    router = start_router(router_args(workers.prefill, workers.decode, "--policy", "round_robin"))
    d0, d1 = workers.decode

    def healthy(stub: StubWorker) -> bool:
        return next(w for w in listing(http, router)["decode"] if w["url"] == stub.url)["healthy"]

    # Without traffic, the periodic checks (every second, three strikes) take it out.
    d0.kill()
    wait_for(lambda: not healthy(d0), timeout=10, what="idle d0 marked unhealthy")
    d0.start()
    wait_for(lambda: healthy(d0), timeout=10, what="d0 healthy again")
    # Under traffic, requests that cannot reach it wake its checks at once; none of them fails.
    d1_before = len(d1.requests())
    d0.kill()
    assert all(http.post(router.url + "/generate", json={"text": f"r{i}"}).status_code == 200 for i in range(20))
    wait_for(lambda: not healthy(d0), timeout=10, what="d0 marked unhealthy under traffic")
    assert len(d1.requests()) - d1_before == 20
    assert in_flight(http, router) == [0, 0, 0, 0]
    d0.start()


# ---- 9: where the API key comes from, and where it never shows ---------------------------------

def test_api_key_from_environment_or_file_never_in_ps_or_logs(
        http: httpx.Client, workers: Workers, start_router: StartRouter, tmp_path: Path) -> None:
    secret = "s3cr3t-key-7f1c"
    key_file = tmp_path / "router.key"
    key_file.write_text(secret + "\n")
    key_file.chmod(0o600)
    routers = [
        start_router(router_args(workers.prefill, workers.decode, *NO_HEALTH), env={"TPLA_API_KEY": secret}),
        start_router(router_args(workers.prefill, workers.decode, *NO_HEALTH, "--api-key-file", str(key_file))),
    ]
    for router in routers:
        assert http.post(router.url + "/generate", json={"text": "no key"}).status_code == 401
        r = http.post(router.url + "/generate", json={"text": "key"}, headers={"Authorization": f"Bearer {secret}"})
        assert r.status_code == 200
        cmdline = Path(f"/proc/{router.proc.pid}/cmdline").read_bytes()
        assert secret.encode() not in cmdline
    # Given on the command line (discouraged), it is still kept out of the logs.
    on_cli = start_router(router_args(workers.prefill, workers.decode, *NO_HEALTH, "--api-key", secret))
    assert http.get(on_cli.url + "/metrics", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    for router in [*routers, on_cli]:
        router.stop()
        log = router.log.read_text()
        assert "api_key=<redacted>" in log and secret not in log, log
    assert "--api-key <redacted>" in on_cli.log.read_text()


def test_api_key_flags_are_checked() -> None:
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "tpla_router", "--api-key", "a", "--api-key-file", "/dev/null"],
                       capture_output=True, text=True, timeout=60, check=False, env=env)
    assert r.returncode == 2 and "give the API key once" in r.stderr
    r = subprocess.run([sys.executable, "-m", "tpla_router", "--api-key-file", "/nonexistent/key"],
                       capture_output=True, text=True, timeout=60, check=False, env=env)
    assert r.returncode == 2 and "cannot read it" in r.stderr
