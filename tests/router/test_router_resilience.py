"""Health checks, circuit breaker, retries, timeouts and aborts, with real processes."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from router_procs import RouterProcess, StubWorker, Workers, router_args, wait_for

StartRouter = Callable[[list[str]], RouterProcess]
FAST_HEALTH = ["--health-check-interval-secs", "0.1", "--health-failure-threshold", "2",
               "--health-success-threshold", "2", "--health-check-timeout-secs", "0.5"]
NO_HEALTH = ["--disable-health-check", "--retry-initial-backoff-ms", "1"]


def worker_state(http: httpx.Client, router: RouterProcess, stub: StubWorker) -> dict[str, Any]:
    listing = http.get(router.url + "/list_workers").json()
    return next(w for w in listing[stub.role] if w["url"] == stub.url)


def generate(http: httpx.Client, router: RouterProcess, n: int, **body: Any) -> list[httpx.Response]:
    return [http.post(router.url + "/generate", json={"text": f"req {i}", **body}) for i in range(n)]


def rids_of(stub: StubWorker) -> list[str]:
    return [r["body"]["rid"] for r in stub.requests()]


def test_health_checks_follow_a_killed_and_restarted_worker(
        http: httpx.Client, workers: Workers, start_router: StartRouter) -> None:
    router = start_router(router_args(workers.prefill, workers.decode, "--policy", "round_robin", *FAST_HEALTH))
    d0, d1 = workers.decode
    d0.kill()
    assert all(r.status_code == 200 for r in generate(http, router, 6))  # retried onto d1 meanwhile
    wait_for(lambda: not worker_state(http, router, d0)["healthy"], what="d0 marked unhealthy")
    before = len(d1.requests())
    assert all(r.status_code == 200 for r in generate(http, router, 4))
    assert len(d1.requests()) == before + 4
    d0.start()
    wait_for(lambda: worker_state(http, router, d0)["healthy"], what="d0 healthy again")
    assert all(r.status_code == 200 for r in generate(http, router, 4))
    assert len(d0.requests()) == 2
    assert http.get(router.url + "/health").json()["decode"] == {"available": 2, "total": 2}


def test_failing_health_endpoint_takes_a_worker_out_and_back(
        http: httpx.Client, workers: Workers, start_router: StartRouter) -> None:
    router = start_router(router_args(workers.prefill, workers.decode, "--policy", "round_robin", *FAST_HEALTH))
    p0 = workers.prefill[0]
    p0.configure(health=503)
    wait_for(lambda: not worker_state(http, router, p0)["healthy"], what="p0 unhealthy")
    generate(http, router, 4)
    assert p0.requests() == []
    p0.configure(health=200)
    wait_for(lambda: worker_state(http, router, p0)["healthy"], what="p0 healthy")
    generate(http, router, 4)
    assert len(p0.requests()) == 2


def test_circuit_breaker_opens_and_recovers(http: httpx.Client, workers: Workers,
                                            start_router: StartRouter) -> None:
    router = start_router(router_args(
        workers.prefill, workers.decode, "--policy", "round_robin", *NO_HEALTH, "--cb-failure-threshold", "2",
        "--cb-success-threshold", "1", "--cb-timeout-duration-secs", "1", "--retry-max-retries", "3"))
    d0 = workers.decode[0]
    d0.configure(status=503)
    assert all(r.status_code == 200 for r in generate(http, router, 4))  # d0's failures retried on d1
    assert len(d0.requests()) == 2
    assert worker_state(http, router, d0)["circuit"] == "open"
    generate(http, router, 6)
    assert len(d0.requests()) == 2  # open: no traffic
    d0.configure(status=200)
    wait_for(lambda: worker_state(http, router, d0)["circuit"] == "half_open", what="half-open")
    generate(http, router, 4)
    assert worker_state(http, router, d0)["circuit"] == "closed"
    assert len(d0.requests()) > 2


def test_failed_pair_is_retried_on_a_new_pair_with_a_new_room(
        http: httpx.Client, workers: Workers, start_router: StartRouter) -> None:
    router = start_router(router_args(workers.prefill, workers.decode, "--policy", "round_robin", *NO_HEALTH))
    p0, p1 = workers.prefill
    p0.configure(drop=True)
    r = http.post(router.url + "/generate", json={"text": "retry me"})
    assert r.status_code == 200
    (first,) = [x["body"] for x in p0.requests()]
    (second,) = [x["body"] for x in p1.requests()]
    assert second["bootstrap_room"] != first["bootstrap_room"] and second["rid"] != first["rid"]
    decoded = {x["body"]["bootstrap_room"]: d for d in workers.decode for x in d.requests()}
    assert set(decoded) == {first["bootstrap_room"], second["bootstrap_room"]}
    assert r.json()["meta_info"]["bootstrap_room"] == second["bootstrap_room"]
    failed_decode = decoded[first["bootstrap_room"]]
    wait_for(lambda: {"rid": first["rid"]} in failed_decode.aborts(), what="abort of the failed attempt")
    assert 'tpla_router_retries_total{route="/generate"} 1.0' in http.get(router.url + "/metrics").text


def test_client_errors_are_not_retried(http: httpx.Client, workers: Workers, start_router: StartRouter) -> None:
    router = start_router(router_args(workers.prefill, workers.decode, *NO_HEALTH))
    for d in workers.decode:
        d.configure(status=400)
    r = http.post(router.url + "/generate", json={"text": "bad"})
    assert r.status_code == 400
    assert r.json() == {"error": {"message": "stub decode failing on purpose"}}
    assert sum(len(d.requests()) for d in workers.decode) == 1


def test_retries_exhausted(http: httpx.Client, workers: Workers, start_router: StartRouter) -> None:
    router = start_router(router_args(workers.prefill, workers.decode, *NO_HEALTH, "--retry-max-retries", "3"))
    for d in workers.decode:
        d.configure(status=503)
    r = http.post(router.url + "/generate", json={"text": "doomed"})
    assert r.status_code == 503
    assert "gave up after 3 attempts" in r.json()["error"]["message"]
    assert sum(len(d.requests()) for d in workers.decode) == 3


def _served_by(workers: Workers) -> tuple[StubWorker, StubWorker, str]:
    # The router sends to both workers at once: the decode may answer before the prefill has logged its copy.
    wait_for(lambda: any(p.requests() for p in workers.prefill), what="the prefill's copy of the request")
    (p, p_rec), = [(p, r) for p in workers.prefill for r in p.requests()]
    (d, d_rec), = [(d, r) for d in workers.decode for r in d.requests()]
    assert p_rec["body"]["rid"] == d_rec["body"]["rid"]
    return p, d, d_rec["body"]["rid"]


def test_client_disconnect_mid_stream_aborts_both_workers(
        http: httpx.Client, workers: Workers, start_router: StartRouter) -> None:
    router = start_router(router_args(workers.prefill, workers.decode, *NO_HEALTH))
    for d in workers.decode:
        d.configure(chunks=50, pause_after=1)
    with http.stream("POST", router.url + "/generate", json={"text": "bye", "stream": True}) as r:
        next(line for line in r.iter_lines() if line.startswith("data: "))
    p, d, rid = _served_by(workers)
    wait_for(lambda: {"rid": rid} in p.aborts() and {"rid": rid} in d.aborts(), what="aborts on both workers")


def test_client_disconnect_while_waiting_aborts_both_workers(
        http: httpx.Client, workers: Workers, start_router: StartRouter) -> None:
    router = start_router(router_args(workers.prefill, workers.decode, *NO_HEALTH))
    for d in workers.decode:
        d.configure(hold=True)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(router.url + "/generate", json={"text": "impatient", "rid": "client-rid-7"}, timeout=0.5)
    p, d, rid = _served_by(workers)
    assert rid == "client-rid-7"
    wait_for(lambda: {"rid": rid} in p.aborts() and {"rid": rid} in d.aborts(), what="aborts on both workers")


def test_request_timeout(http: httpx.Client, workers: Workers, start_router: StartRouter) -> None:
    router = start_router(router_args(workers.prefill, workers.decode, *NO_HEALTH, "--request-timeout-secs", "0.5"))
    for d in workers.decode:
        d.configure(hold=True)
    r = http.post(router.url + "/generate", json={"text": "slow"})
    assert r.status_code == 504 and "timed out" in r.json()["error"]["message"]
    p, d, rid = _served_by(workers)
    wait_for(lambda: {"rid": rid} in p.aborts() and {"rid": rid} in d.aborts(), what="aborts on both workers")


def test_decode_stream_breaking_ends_with_an_error_event(
        http: httpx.Client, workers: Workers, start_router: StartRouter) -> None:
    router = start_router(router_args(workers.prefill, workers.decode, *NO_HEALTH))
    for d in workers.decode:
        d.configure(chunks=5, pause_after=2, break_after=2)
    with http.stream("POST", router.url + "/generate", json={"text": "fragile", "stream": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        seen = [next(line for line in lines if line.startswith("data: ")) for _ in range(2)]
        for d in workers.decode:
            d.release()  # now the decode drops its connection mid-stream
        seen += list(lines)
    events = [json.loads(line[6:]) for line in seen if line.startswith("data: ") and line != "data: [DONE]"]
    assert [e["meta_info"]["completion_tokens"] for e in events[:2]] == [1, 2]
    assert "stream broke" in events[2]["error"]["message"] and len(events) == 3
    assert [line for line in seen if line][-1] == "data: [DONE]"
