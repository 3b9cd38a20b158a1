"""Router state: worker pools, policies, health checks, aborts and the background loops."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator

import orjson

from .config import Role, RouterConfig, WorkerSpec
from .errors import RouterError
from .health import HealthMonitor
from .http import UpstreamError
from .metrics import RouterMetrics
from .policies import Policy, make_policy
from .upstream import Reply
from .worker import Lease, Worker, WorkerPool

logger = logging.getLogger(__name__)


class Router:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.pools = {role: WorkerPool(role) for role in Role}
        for spec in config.prefill + config.decode:
            self.pools[spec.role].add(Worker(spec, config))
        self.policies: dict[Role, Policy] = {
            Role.PREFILL: make_policy(config.effective_prefill_policy, config),
            Role.DECODE: make_policy(config.effective_decode_policy, config),
        }
        self.metrics = RouterMetrics(self.workers)
        self.health = HealthMonitor(config)
        self._maintenance: asyncio.Task[None] | None = None

    def workers(self) -> Iterator[Worker]:
        for pool in self.pools.values():
            yield from pool

    async def start(self) -> None:
        for worker in self.workers():
            self.health.watch(worker)
        self._maintenance = asyncio.get_running_loop().create_task(self._maintenance_loop())

    async def stop(self) -> None:
        if self._maintenance is not None:
            self._maintenance.cancel()
            await asyncio.gather(self._maintenance, return_exceptions=True)
        await self.health.stop()
        for worker in self.workers():
            worker.upstream.close()

    def select_pair(self, key: str | None, exclude: set[str]) -> tuple[Lease, Lease]:
        """Pick a (prefill, decode) pair and count the request against both until the leases are released."""
        prefills = self.pools[Role.PREFILL].candidates(exclude)
        if not prefills:
            raise RouterError(503, "no available prefill worker", "no_worker")
        decodes = self.pools[Role.DECODE].candidates(exclude)
        if not decodes:
            raise RouterError(503, "no available decode worker", "no_worker")
        prefill = self.policies[Role.PREFILL].select(prefills, key)
        decode = self.policies[Role.DECODE].select(decodes, key)
        return prefill.acquire(), decode.acquire()

    def abort(self, workers: Iterable[Worker], rids: list[str]) -> None:
        """Tell workers to drop a request (client gone, attempt failed); fire and forget."""
        deadline = asyncio.get_running_loop().time() + self.config.health_check_timeout_secs
        for worker in workers:
            for rid in rids:
                self.metrics.aborts.inc()
                body = (orjson.dumps({"rid": rid}),)
                worker.upstream.send(b"POST", b"/abort_request", body, deadline).detach()

    async def add_worker(self, spec: WorkerSpec) -> Worker:
        """Register a worker after it answers its health endpoint once."""
        pool = self.pools[spec.role]
        if spec.url in pool:
            raise RouterError(409, f"{spec.role.value} worker {spec.url} is already registered", "admin")
        worker = Worker(spec, self.config)
        error = await self.health.probe(worker)
        if error is not None:
            worker.upstream.close()
            raise RouterError(503, f"worker {spec.url} failed its health check: {error}", "admin")
        if spec.url in pool:  # added by a concurrent call while this one probed
            worker.upstream.close()
            raise RouterError(409, f"{spec.role.value} worker {spec.url} is already registered", "admin")
        pool.add(worker)
        self.health.watch(worker)
        logger.info("added %s worker %s", spec.role.value, spec.url)
        return worker

    def remove_worker(self, url: str) -> Worker:
        """Stop routing to a worker; requests already on it run to completion."""
        for role, pool in self.pools.items():
            if url in pool:
                worker = pool.remove(url)
                self.health.unwatch(worker)
                self.policies[role].on_worker_removed(url)
                worker.upstream.close()
                logger.info("removed %s worker %s", role.value, url)
                return worker
        raise RouterError(404, f"no worker {url}", "admin")

    async def fetch(self, worker: Worker, method: str, path: str, timeout_secs: float | None = None,
                    body: bytes = b"") -> Reply:
        """One small request to a worker (info, admin fan-out), never raising."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout_secs or self.config.health_check_timeout_secs)
        exchange = worker.upstream.send(method.encode(), path.encode(), (body,) if body else (), deadline)
        try:
            await exchange.ready
        except UpstreamError as e:
            return Reply(None, error=f"{type(e).__name__}: {e}")
        finally:
            exchange.close()
        return Reply(exchange.status, exchange.body(), exchange.content_type)

    async def _maintenance_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.eviction_interval_secs)
            for policy in self.policies.values():
                policy.maintain()
