"""`--role cluster` on a local Ray cluster (a head and a second node process), CPU only: the shipped
cluster file's router, prefill and decode (T=2 spread over both nodes) serve through the router; killing
the decode server's actor is followed by its restart and renewed service, and no request hangs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cluster import wait_healthy
from tpla_serve.net import free_port

ray = pytest.importorskip("ray", reason="the Ray cluster test needs ray (pip install 'tpla-serve[ray]')")
import yaml  # noqa: E402  (comes with ray)
from ray.cluster_utils import Cluster as RayTestCluster  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PARAMS = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def ray_nodes() -> Iterator[RayTestCluster]:
    nodes = RayTestCluster(initialize_head=True, connect=False,
                           head_node_args={"num_cpus": 3, "include_dashboard": False})
    try:
        nodes.add_node(num_cpus=3)
        nodes.wait_for_nodes()
        yield nodes
    finally:
        nodes.shutdown()


@pytest.fixture(scope="module")
def placed(ray_nodes, tmp_path_factory) -> Iterator[str]:
    config = yaml.safe_load((ROOT / "launch" / "cluster.yaml").read_text())
    config["router"]["port"] = free_port()
    path = tmp_path_factory.mktemp("cluster") / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tpla_serve.launch", "--role", "cluster", "--ray-address", ray_nodes.address,
         "--config", str(path), "--log-level", "warning"],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}, start_new_session=True)
    url = f"http://{ray_nodes.head_node.node_ip_address}:{config['router']['port']}"
    try:
        wait_healthy(url, proc, timeout=600)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the cluster stops its servers and actors
        assert proc.wait(120) == 0


def _generate(url: str) -> httpx.Response:
    # The timeout guards against a hang only; every answer, success or error, arrives well within it.
    return httpx.post(url + "/generate", json={"text": PROMPT, "sampling_params": PARAMS}, timeout=120)


def test_requests_through_the_router_and_a_restarted_decode_server(ray_nodes, placed):
    first = _generate(placed)
    assert first.status_code == 200, first.text
    want = first.json()["output_ids"]
    assert len(want) == PARAMS["max_new_tokens"]

    decode_url = httpx.get(placed + "/list_workers", timeout=10).json()["decode"][0]["url"]
    ray.init(address=ray_nodes.address, namespace="tpla-serve", logging_level="WARNING")
    try:
        actor = ray.get_actor("tpla-decode-0-node-0", namespace="tpla-serve")
        ray.kill(actor, no_restart=False)  # Ray restarts it; the cluster starts the server again
    finally:
        ray.shutdown()
    deadline = time.monotonic() + 300  # a restart takes seconds; the bound keeps a broken one from hanging
    while _healthy(decode_url):  # the killed actor's server stops with it
        assert time.monotonic() < deadline, "the killed decode server still answers"
    while (r := _generate(placed)).status_code != 200:  # errors while it restarts, never a hang
        assert r.status_code in (502, 503, 504), r.text
        assert time.monotonic() < deadline, "the decode server did not come back"
    assert r.json()["output_ids"] == want
    assert _healthy(decode_url)  # back at the same address, registered with the router as before


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False
