from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from router_procs import RouterProcess, StubWorker, Workers


@pytest.fixture(scope="module")
def module_workers() -> Iterator[Workers]:
    stubs = StubWorker.many(["prefill", "prefill", "decode", "decode"])
    ws = Workers(stubs[:2], stubs[2:])
    yield ws
    for w in ws.all:
        w.stop()


@pytest.fixture
def workers(module_workers: Workers) -> Workers:
    """The module's two prefill and two decode stubs, running and reset to default behaviour."""
    for w in module_workers.all:
        if w.proc is None or w.proc.poll() is not None:
            w.start()
        w.reset()
    return module_workers


@pytest.fixture
def start_router() -> Iterator[Callable[..., RouterProcess]]:
    routers: list[RouterProcess] = []

    def start(args: list[str], **kwargs: Any) -> RouterProcess:
        router = RouterProcess(args, **kwargs)
        routers.append(router)
        return router

    yield start
    for r in routers:
        r.stop()


@pytest.fixture(scope="session")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client
