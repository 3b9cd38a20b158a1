"""Router state: worker pools, policies, the upstream HTTP session and the background loops."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable, Iterator
from typing import Any

import aiohttp

from .config import Role, RouterConfig, WorkerSpec
from .errors import RouterError
from .metrics import RouterMetrics
from .policies import Policy, make_policy
from .upstream import Reply
from .worker import Worker, WorkerPool

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
        self._session: aiohttp.ClientSession | None = None
        self._loops: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Router.start() has not run")
        return self._session

    def workers(self) -> Iterator[Worker]:
        for pool in self.pools.values():
            yield from pool

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60)
        # Bodies pass through byte for byte: ask workers not to compress, and never decompress. A
        # proxy keeps no cookies: one client's Set-Cookie must never ride along on another's request.
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, skip_auto_headers=("Accept-Encoding",),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        if not self.config.disable_health_check:
            self._loops.append(asyncio.create_task(self._health_loop()))
        self._loops.append(asyncio.create_task(self._maintenance_loop()))

    async def stop(self) -> None:
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self._background:
            await asyncio.wait(self._background, timeout=self.config.health_check_timeout_secs)
        if self._session is not None:
            await self._session.close()

    def select_pair(self, key: str | None, exclude: set[str]) -> tuple[Worker, Worker]:
        """Pick a (prefill, decode) pair and count the request against both."""
        chosen = []
        for role in (Role.PREFILL, Role.DECODE):
            candidates = self.pools[role].candidates(exclude)
            if not candidates:
                raise RouterError(503, f"no available {role.value} worker", "no_worker")
            chosen.append(self.policies[role].select(candidates, key))
        prefill, decode = chosen
        prefill.acquire()
        decode.acquire()
        return prefill, decode

    def track(self, aw: Coroutine[Any, Any, Any] | asyncio.Future[Any]) -> None:
        """Let work outlive the request that started it; stop() waits for it briefly."""
        task = asyncio.ensure_future(aw)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def abort(self, workers: Iterable[Worker], rids: list[str], headers: dict[str, str]) -> None:
        """Tell workers to drop a request (client gone, attempt failed); fire and forget."""
        for worker in workers:
            for rid in rids:
                self.metrics.aborts.inc()
                self.track(self._abort(worker, rid, headers))

    async def _abort(self, worker: Worker, rid: str, headers: dict[str, str]) -> None:
        timeout = aiohttp.ClientTimeout(total=self.config.health_check_timeout_secs)
        try:
            async with self.session.post(f"{worker.url}/abort_request", json={"rid": rid}, headers=headers,
                                         timeout=timeout) as resp:
                await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            logger.debug("abort of %s on %s failed: %s", rid, worker.url, e)

    async def add_worker(self, spec: WorkerSpec) -> Worker:
        """Register a worker after it answers its health endpoint once."""
        pool = self.pools[spec.role]
        if spec.url in pool:
            raise RouterError(409, f"{spec.role.value} worker {spec.url} is already registered", "admin")
        error = await self.probe(spec.url)
        if error is not None:
            raise RouterError(503, f"worker {spec.url} failed its health check: {error}", "admin")
        worker = Worker(spec, self.config)
        pool.add(worker)
        logger.info("added %s worker %s", spec.role.value, spec.url)
        return worker

    def remove_worker(self, url: str) -> Worker:
        """Stop routing to a worker; requests already on it run to completion."""
        for role, pool in self.pools.items():
            if url in pool:
                worker = pool.remove(url)
                self.policies[role].on_worker_removed(url)
                logger.info("removed %s worker %s", role.value, url)
                return worker
        raise RouterError(404, f"no worker {url}", "admin")

    async def fetch(self, url: str, method: str, path: str, headers: dict[str, str] | None = None,
                    timeout_secs: float | None = None) -> Reply:
        """One small request to a worker (info, health, admin fan-out), never raising."""
        timeout = aiohttp.ClientTimeout(total=timeout_secs or self.config.health_check_timeout_secs)
        try:
            async with self.session.request(method, url + path, headers=headers, timeout=timeout) as resp:
                return Reply(resp.status, await resp.read(), resp.headers.get("Content-Type"))
        except asyncio.TimeoutError:
            return Reply(None, error="timed out", timed_out=True)
        except aiohttp.ClientError as e:
            return Reply(None, error=f"{type(e).__name__}: {e}")

    async def probe(self, url: str) -> str | None:
        """GET the health endpoint; None if it answered 2xx, else why not."""
        reply = await self.fetch(url, "GET", self.config.health_check_endpoint)
        if reply.ok:
            return None
        return reply.error if reply.status is None else f"HTTP {reply.status}"

    async def _check(self, worker: Worker) -> None:
        was_healthy = worker.healthy
        worker.record_health(await self.probe(worker.url) is None)
        if worker.healthy != was_healthy:
            logger.warning("%s worker %s is now %s", worker.role.value, worker.url,
                           "healthy" if worker.healthy else "unhealthy")

    async def _health_loop(self) -> None:
        while True:
            await asyncio.gather(*(self._check(w) for w in self.workers()))
            await asyncio.sleep(self.config.health_check_interval_secs)

    async def _maintenance_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.eviction_interval_secs)
            for policy in self.policies.values():
                policy.maintain()
