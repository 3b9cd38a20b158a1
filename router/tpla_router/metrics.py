"""Prometheus metrics of one router, in a registry of its own (never the process-global one)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .worker import Worker

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 120.0, 300.0, 600.0, 1800.0)


class _WorkerCollector(Collector):
    """Reads per-worker state at scrape time, so removed workers simply disappear."""

    def __init__(self, workers: Callable[[], Iterable[Worker]]) -> None:
        self._workers = workers

    def collect(self) -> Iterator[Metric]:
        labels = ["role", "url"]
        in_flight = GaugeMetricFamily("tpla_router_worker_in_flight", "Requests in flight on a worker", labels=labels)
        healthy = GaugeMetricFamily("tpla_router_worker_healthy", "1 if the worker passes health checks", labels=labels)
        circuit = GaugeMetricFamily("tpla_router_worker_circuit_state",
                                    "Circuit breaker: 0 closed, 1 open, 2 half-open", labels=labels)
        sent = CounterMetricFamily("tpla_router_worker_requests", "Requests sent to a worker", labels=labels)
        for w in self._workers():
            key = [w.role.value, w.url]
            in_flight.add_metric(key, w.in_flight)
            healthy.add_metric(key, 1.0 if w.healthy else 0.0)
            circuit.add_metric(key, int(w.breaker.state))
            sent.add_metric(key, w.requests_total)
        yield from (in_flight, healthy, circuit, sent)


class RouteMetrics(NamedTuple):
    """One route's labelled children, resolved once (labels() costs a lock and a lookup per call)."""

    requests: Counter
    retries: Counter
    duration: Histogram
    first_byte: Histogram


class RouterMetrics:
    def __init__(self, workers: Callable[[], Iterable[Worker]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter("tpla_router_requests", "Requests received, by route", ["route"],
                                registry=self.registry)
        self.errors = Counter("tpla_router_errors", "Errors, by kind", ["kind"], registry=self.registry)
        self.retries = Counter("tpla_router_retries", "Attempts retried on a new pair, by route", ["route"],
                               registry=self.registry)
        self.aborts = Counter("tpla_router_aborts", "abort_request calls sent to workers",
                              registry=self.registry)
        self.duration = Histogram("tpla_router_request_duration_seconds",
                                  "Time from request to the last byte of the response, by route", ["route"],
                                  buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.first_byte = Histogram("tpla_router_time_to_first_byte_seconds",
                                    "Streaming: time from request to the first byte sent, by route", ["route"],
                                    buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_WorkerCollector(workers))
        self._routes: dict[str, RouteMetrics] = {}

    def route(self, path: str) -> RouteMetrics:
        metrics = self._routes.get(path)
        if metrics is None:
            metrics = RouteMetrics(self.requests.labels(path), self.retries.labels(path),
                                   self.duration.labels(path), self.first_byte.labels(path))
            self._routes[path] = metrics
        return metrics

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
