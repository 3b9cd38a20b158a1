"""Active health checks: one probing loop per worker, woken early when a request could not reach it.

A worker flips to unhealthy after `health_failure_threshold` consecutive failed probes. Probes run
every `health_check_interval_secs`; a request that found the worker unreachable (refused, reset)
wakes its loop at once, so under traffic a dead worker leaves rotation after a few instant refusals
rather than after several intervals. The circuit breaker covers workers that answer probes but fail
real requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from .config import RouterConfig
from .http import UpstreamError
from .worker import Worker

logger = logging.getLogger(__name__)


class HealthMonitor:
    def __init__(self, config: RouterConfig) -> None:
        self._interval = config.health_check_interval_secs
        self._timeout = config.health_check_timeout_secs
        self._endpoint = config.health_check_endpoint.encode()
        self._enabled = not config.disable_health_check
        self._loops: dict[Worker, asyncio.Task[None]] = {}
        self._pokes: dict[Worker, asyncio.Event] = {}

    async def probe(self, worker: Worker) -> str | None:
        """GET the health endpoint once; None if it answered 2xx, else why not."""
        loop = asyncio.get_running_loop()
        exchange = worker.upstream.send(b"GET", self._endpoint, (), loop.time() + self._timeout)
        try:
            await exchange.ready
        except UpstreamError as e:
            return str(e)
        finally:
            exchange.close()
        status = exchange.status
        return None if status is not None and 200 <= status < 300 else f"HTTP {status}"

    def watch(self, worker: Worker) -> None:
        if self._enabled:
            self._pokes[worker] = asyncio.Event()
            self._loops[worker] = asyncio.get_running_loop().create_task(self._watch(worker, self._pokes[worker]))

    def unwatch(self, worker: Worker) -> None:
        task = self._loops.pop(worker, None)
        self._pokes.pop(worker, None)
        if task is not None:
            task.cancel()

    def poke(self, worker: Worker) -> None:
        """A request could not reach `worker`: probe it now rather than at the next interval."""
        event = self._pokes.get(worker)
        if event is not None:
            event.set()

    async def stop(self) -> None:
        tasks = list(self._loops.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loops.clear()
        self._pokes.clear()

    async def _watch(self, worker: Worker, poke: asyncio.Event) -> None:
        while True:
            poke.clear()
            error = await self.probe(worker)
            if worker.record_health(error is None):
                if worker.healthy:
                    logger.warning("%s worker %s is healthy again", worker.role.value, worker.url)
                else:
                    logger.warning("%s worker %s is unhealthy: %s", worker.role.value, worker.url, error)
            with contextlib.suppress(asyncio.TimeoutError):  # wait_for cancels the wait when cancelled itself
                await asyncio.wait_for(poke.wait(), self._interval)
