from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster import Cluster

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
