"""Workers as the router sees them: address, in-flight load, health state and circuit breaker."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import orjson

from .circuit_breaker import CircuitBreaker
from .config import Role, RouterConfig, WorkerSpec
from .http import UpstreamPool


class Lease:
    """One request's share of a worker's in-flight count; `release` is idempotent (and a done-callback)."""

    __slots__ = ("held", "worker")

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.held = True

    def release(self, _: object = None) -> None:
        if self.held:
            self.held = False
            self.worker.in_flight -= 1


class Worker:
    """One prefill or decode server, with its pool of keep-alive connections.

    A request holds a reference to its Worker for its whole life, so removing a worker from its pool
    stops new traffic while in-flight requests finish and release their load here.
    """

    def __init__(self, spec: WorkerSpec, config: RouterConfig) -> None:
        self.spec = spec
        self.url = spec.url
        self.role = spec.role
        self.bootstrap_host = urlsplit(spec.url).hostname
        self.bootstrap_port = spec.bootstrap_port
        # The PD fields as JSON, encoded once: every request through this prefill carries them.
        self._host_json = orjson.dumps(self.bootstrap_host)
        self._port_json = orjson.dumps(self.bootstrap_port)
        self.bootstrap_fields = b'"bootstrap_host":%b,"bootstrap_port":%b' % (self._host_json, self._port_json)
        headers = () if config.api_key is None else ((b"Authorization", f"Bearer {config.api_key}".encode()),)
        self.upstream = UpstreamPool(spec.url, headers)
        self.in_flight = 0
        self.requests_total = 0
        self.healthy = True
        self._health_failures = 0
        self._health_successes = 0
        self._health_failure_threshold = config.health_failure_threshold
        self._health_success_threshold = config.health_success_threshold
        self.breaker = CircuitBreaker(
            config.cb_failure_threshold,
            config.cb_success_threshold,
            config.cb_timeout_duration_secs,
            enabled=not config.disable_circuit_breaker,
        )

    def bootstrap_fields_batch(self, n: int) -> bytes:
        """The PD fields of a batch of `n`: one host and port per item."""
        hosts, ports = b",".join([self._host_json] * n), b",".join([self._port_json] * n)
        return b'"bootstrap_host":[%b],"bootstrap_port":[%b]' % (hosts, ports)

    @property
    def available(self) -> bool:
        return self.healthy and self.breaker.allows()

    def acquire(self) -> Lease:
        self.in_flight += 1
        self.requests_total += 1
        return Lease(self)

    def record_health(self, ok: bool) -> bool:
        """Flip health only after `threshold` consecutive results, so one blip changes nothing.

        Returns whether this result flipped it.
        """
        was = self.healthy
        if ok:
            self._health_failures = 0
            self._health_successes += 1
            if not self.healthy and self._health_successes >= self._health_success_threshold:
                self.healthy = True
        else:
            self._health_successes = 0
            self._health_failures += 1
            if self.healthy and self._health_failures >= self._health_failure_threshold:
                self.healthy = False
        return self.healthy != was

    def describe(self) -> dict[str, object]:
        return {
            "url": self.url,
            "role": self.role.value,
            "bootstrap_port": self.bootstrap_port,
            "healthy": self.healthy,
            "circuit": self.breaker.state.name.lower(),
            "in_flight": self.in_flight,
        }


class WorkerPool:
    """The workers of one role, in insertion order."""

    def __init__(self, role: Role) -> None:
        self.role = role
        self._workers: dict[str, Worker] = {}

    def __iter__(self) -> Iterator[Worker]:
        return iter(list(self._workers.values()))

    def __len__(self) -> int:
        return len(self._workers)

    def __contains__(self, url: str) -> bool:
        return url in self._workers

    def add(self, worker: Worker) -> None:
        if worker.role is not self.role:
            raise ValueError(f"cannot add a {worker.role.value} worker to the {self.role.value} pool")
        if worker.url in self._workers:
            raise ValueError(f"{self.role.value} worker {worker.url} is already registered")
        self._workers[worker.url] = worker

    def remove(self, url: str) -> Worker:
        try:
            return self._workers.pop(url)
        except KeyError:
            raise KeyError(f"no {self.role.value} worker {url}") from None

    def candidates(self, exclude: set[str]) -> list[Worker]:
        """Available workers, avoiding `exclude` unless nothing else is available."""
        available = [w for w in self._workers.values() if w.available]
        preferred = [w for w in available if w.url not in exclude]
        return preferred or available
