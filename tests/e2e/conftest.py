from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster import HOST, Cluster, free_port, wait_healthy

MODEL = str(Path(__file__).resolve().parents[2] / "models" / "mla-tiny")


@pytest.fixture(scope="package")
def cluster() -> Iterator[Cluster]:
    c = Cluster(MODEL)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def tpla_engine():
    """The in-process engine with the decode server's TPLA configuration: what PD greedy output must equal.
    Module-scoped: it holds this process's TP group, which later test directories need for their own."""
    from tpla_serve import Engine

    with Engine(model_path=MODEL, device="cpu", tp_size=2, tpla_groups=2, kv_cache_bytes=1 << 26) as engine:
        yield engine


@pytest.fixture(scope="module")
def sglang_router(cluster) -> Iterator[str]:
    """The real sglang-router binary in PD mode in front of the cluster's prefill and decode servers."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sglang_router.launch_router",
            "--pd-disaggregation",
            "--prefill",
            cluster.prefill_url,
            str(cluster.bootstrap_port),
            "--decode",
            cluster.decode_url,
            "--host",
            HOST,
            "--port",
            str(port),
            "--prometheus-port",
            str(free_port()),
            "--log-level",
            "warn",
        ]
    )
    try:
        url = f"http://{HOST}:{port}"
        wait_healthy(url, proc, timeout=60)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
