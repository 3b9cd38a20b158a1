"""Start-up and shutdown of a TP=2 server: /health only once loaded and warmed up, a watchdog for stuck steps,
and no process left behind."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from server_procs import ServerProcess, alive, descendants, scheduler_pid, tp_rank_pids

TPLA = ("--tp-size", "2", "--tpla-groups", "2")
WATCHDOG_S = 10  # far above a step of the tiny model on a loaded CI machine


def wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive(pids)


def test_health_waits_for_the_model_and_sigterm_leaves_no_orphans(chat_model_dir) -> None:
    server = ServerProcess(chat_model_dir, *TPLA, api_key=None)
    answers = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and server.proc.poll() is None:
        try:
            r = httpx.get(server.url + "/health", timeout=2)
        except httpx.TransportError:
            time.sleep(0.1)
            continue
        answers.append(r.status_code)
        if r.status_code == 200:
            break
        assert "starting" in r.json()["error"]["message"]
        status = server.client.post("/generate", json={"input_ids": [1]}).status_code
        if status != 503:  # only if the server became ready between the two requests
            assert status == 200 and httpx.get(server.url + "/health", timeout=2).status_code == 200
        time.sleep(0.1)
    assert answers and answers[-1] == 200, answers
    assert set(answers[:-1]) <= {503}
    assert server.stats()["generated_tokens"] >= 1  # the warm-up request ran before /health said 200
    body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 4}}
    r = server.client.post("/generate", json=body)
    assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 4

    tree = descendants(server.proc.pid)
    assert len(tree) >= 2  # the scheduler and TP rank 1 (plus multiprocessing helpers)
    assert server.stop(signal.SIGTERM) == 0
    assert not wait_gone(tree, 30), "processes left after SIGTERM"


@pytest.fixture(scope="module")
def doomed(chat_model_dir) -> Iterator[list[ServerProcess]]:
    """Servers for the tests that kill or stop a process (TP=2; TP=1 without warm-up; TP=2 with a short
    watchdog), started together to share the start-up time."""
    flags = (TPLA, ("--skip-server-warmup",), (*TPLA, "--watchdog-timeout", str(WATCHDOG_S)))
    servers = [ServerProcess(chat_model_dir, *args, api_key=None) for args in flags]
    try:
        for s in servers:
            s.wait_healthy()
        yield servers
    finally:
        for s in servers:
            s.stop(signal.SIGKILL)


def test_scheduler_and_ranks_exit_when_the_front_dies(doomed: list[ServerProcess]) -> None:
    server = doomed[0]
    tree = descendants(server.proc.pid)
    assert len(tree) >= 2
    server.stop(signal.SIGKILL)
    assert not wait_gone(tree, 60), "processes left after the front was killed"


def test_skip_server_warmup_reports_ready_without_generating(doomed: list[ServerProcess]) -> None:
    assert doomed[1].stats()["generated_tokens"] == 0


def test_a_dead_scheduler_fails_requests_and_stops_the_server(doomed: list[ServerProcess]) -> None:
    server = doomed[1]
    tree = descendants(server.proc.pid)
    scheduler = scheduler_pid(server.proc.pid)
    result: dict = {}
    body = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 1000, "ignore_eos": True}}
    worker = threading.Thread(target=lambda: result.update(r=server.client.post("/generate", json=body)))
    worker.start()
    deadline = time.monotonic() + 60
    while server.stats()["num_running"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(scheduler, signal.SIGKILL)
    worker.join(60)
    assert result["r"].status_code == 503
    assert "scheduler" in result["r"].json()["error"]["message"]
    assert server.proc.wait(60) == 1
    assert not wait_gone(tree, 30), "processes left after the scheduler died"


def test_a_stuck_step_trips_the_watchdog_and_stops_the_server(doomed: list[ServerProcess]) -> None:
    """TP rank 1 stopped mid-decode: rank 0's step waits in a collective that never completes."""
    server = doomed[2]
    tree = descendants(server.proc.pid)
    (rank,) = tp_rank_pids(scheduler_pid(server.proc.pid))
    result: dict = {}
    body = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 1000, "ignore_eos": True}}
    worker = threading.Thread(target=lambda: result.update(r=server.client.post("/generate", json=body)))
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while server.stats()["num_running"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(rank, signal.SIGSTOP)
        worker.join(120)
        assert result["r"].status_code == 503, result["r"].text
        assert "--watchdog-timeout" in result["r"].json()["error"]["message"]
        assert server.proc.wait(60) == 1
        assert not wait_gone(tree, 30), "processes left after the watchdog stopped the server"
    finally:
        if alive({rank}):
            os.kill(rank, signal.SIGKILL)
