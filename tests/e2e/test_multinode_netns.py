"""A PD cluster over four hosts (network namespaces): the prefill on A, a decode server with TP=2 spanning
B and C (`--nnodes 2`), the router on D. Its greedy outputs equal the single-host `--role all` cluster's;
killing host C's rank aborts the requests in flight and takes the decode server out of service."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from netns import Hosts, unavailable

MODEL = str(Path(__file__).resolve().parents[2] / "models" / "mla-tiny")
PARAMS = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n\n", "class Stack:"]
PORT, BOOTSTRAP, DIST = 30000, 8998, 5000
SERVER = ["--model-path", MODEL, "--kv-cache-bytes", str(1 << 26), "--disaggregation-timeout", "20",
          "--disaggregation-bootstrap-port", str(BOOTSTRAP), "--log-level", "warning"]

pytestmark = pytest.mark.skipif((why := unavailable()) is not None, reason=why or "")


def _client() -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=120)


def _wait_healthy(client: httpx.Client, url: str, procs: list[subprocess.Popen], timeout: float = 300
                  ) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args[4:10]} exited with code {p.returncode} while starting")
        try:
            if client.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} was not healthy within {timeout} s")


class MultiNodeCluster:
    def __init__(self, hosts: Hosts) -> None:
        self.hosts = hosts
        a, b, d = (hosts.addresses[h] for h in "abd")
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TPLA_DISAGGREGATION_SECRET": "multinode-test"}
        self.procs: dict[str, subprocess.Popen] = {}
        self._launch("a", ["--role", "prefill", *SERVER, "--host", a, "--port", str(PORT)])
        self._launch("d", ["--role", "router", "--host", d, "--port", str(PORT), "--prefill",
                           f"http://{a}:{PORT}", str(BOOTSTRAP), "--decode", f"http://{b}:{PORT}",
                           "--log-level", "warning"])
        self.url = f"http://{d}:{PORT}"
        self.decode_url = f"http://{b}:{PORT}"
        self.start_decode()
        with _client() as client:
            for url in (f"http://{a}:{PORT}", self.url):
                _wait_healthy(client, url, list(self.procs.values()))

    def _launch(self, host: str, args: list[str]) -> None:
        argv = self.hosts.command(host, [sys.executable, "-m", "tpla_serve.launch", *args])
        self.procs[host] = subprocess.Popen(argv, env=self.env, start_new_session=True)

    def start_decode(self) -> None:
        """The decode server: node 0 on host B, node 1 on host C."""
        b = self.hosts.addresses["b"]
        decode = ["--role", "decode", *SERVER, "--port", str(PORT), "--tp-size", "2", "--tpla-groups", "2",
                  "--nnodes", "2", "--dist-init-addr", f"{b}:{DIST}"]
        self._launch("b", [*decode, "--host", b, "--node-rank", "0"])
        self._launch("c", [*decode, "--host", self.hosts.addresses["c"], "--node-rank", "1"])
        with _client() as client:
            _wait_healthy(client, self.decode_url, list(self.procs.values()))

    def kill(self, host: str) -> None:
        os.killpg(self.procs[host].pid, signal.SIGKILL)
        self.procs[host].wait()

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.fixture(scope="module")
def multinode() -> Iterator[MultiNodeCluster]:
    hosts = Hosts(["a", "b", "c", "d"])
    try:
        cluster = MultiNodeCluster(hosts)
        try:
            yield cluster
        finally:
            cluster.stop()
    finally:
        hosts.close()


def _generate(client: httpx.Client, url: str, prompt: str) -> list[int]:
    r = client.post(url + "/generate", json={"text": prompt, "sampling_params": PARAMS})
    assert r.status_code == 200, r.text
    return r.json()["output_ids"]


def test_greedy_outputs_equal_the_single_host_cluster(multinode, cluster):
    with _client() as client:
        want = [_generate(client, cluster.url, p) for p in PROMPTS]
        with ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent: one decode batch across both hosts
            got = list(pool.map(lambda p: _generate(client, multinode.url, p), PROMPTS))
    assert got == want


def _stream_events(client: httpx.Client, url: str, started: list[bool]) -> list[dict]:
    body = {"text": PROMPTS[0], "stream": True,
            "sampling_params": {"max_new_tokens": 900, "temperature": 0, "ignore_eos": True}}
    events = []
    with client.stream("POST", url + "/generate", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
                started[0] = True
    return events


def test_killing_a_rank_on_host_c_aborts_requests_and_fails_health(multinode):
    with _client() as client, ThreadPoolExecutor(1) as pool:
        started = [False]
        stream = pool.submit(_stream_events, client, multinode.url, started)
        while not started[0]:  # tokens are flowing: the request is in flight on both hosts
            assert not stream.done(), stream.result()
            time.sleep(0.1)
        multinode.kill("c")
        events = stream.result()  # ends: no hang
        assert "error" in events[-1], events[-1]
        assert "TP rank 1" in json.dumps(events[-1]), events[-1]
        healthy = True
        while healthy:  # the decode server stops: its /health fails (503, then no answer)
            try:
                healthy = client.get(multinode.decode_url + "/health", timeout=2).status_code == 200
            except httpx.TransportError:
                healthy = False
            time.sleep(0.2)
        assert multinode.procs["b"].wait(60) != 0  # node 0's server exits, failed


def test_the_other_node_exits_cleanly_when_node_0_goes(multinode):
    multinode.start_decode()  # the previous test stopped it
    multinode.kill("b")
    assert multinode.procs["c"].wait(120) == 0  # its rank saw rank 0's connection drop and left
