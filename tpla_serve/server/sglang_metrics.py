"""SGLang's metric names (`sglang:*`, --enable-metrics), so SGLang's dashboards and alerts read this server.

Names, kinds and labels follow SGLang's TokenizerMetricsCollector and SchedulerMetricsCollector: every
series carries `model_name` (the served model name) and `engine_type` (prefill, decode or unified);
per-request counters and latency histograms add `is_streaming` where SGLang does. Request-level series
are observed by the front as requests finish; scheduler state is read from the scheduler's latest Stats
at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 120.0, 160.0)
_ITL_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.06, 0.08, 0.1, 0.2,
                0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0)
_E2E_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0, 150.0,
                200.0, 250.0, 300.0, 350.0, 500.0, 1000.0)
_QUEUE_BUCKETS = (0.0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0,
                  500.0, 1000.0)
_KV_SPEED_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 200.0, 400.0)
_KV_LATENCY_BUCKETS = (1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0)

# SGLang gauge -> (how to read it from the scheduler's Stats, help).
_STATE_GAUGES: tuple[tuple[str, Callable[[dict[str, Any]], float], str], ...] = (
    ("num_running_reqs", lambda s: s.get("num_running", 0), "The number of running requests."),
    ("num_queue_reqs", lambda s: s.get("num_waiting", 0), "The number of requests in the waiting queue."),
    ("num_used_tokens", lambda s: s.get("pages_used", 0) * s.get("page_size", 0), "The number of used tokens."),
    ("max_total_num_tokens", lambda s: s.get("max_total_tokens", 0),
     "Maximum total number of tokens in the KV cache pool."),
    ("token_usage", lambda s: _ratio(s.get("pages_used", 0) * s.get("page_size", 0), s.get("max_total_tokens", 0)),
     "The token usage."),
    ("gen_throughput", lambda s: s.get("gen_throughput", 0.0), "The generation throughput (token/s)."),
    ("spec_accept_length", lambda s: s.get("spec_accept_length", 0.0),
     "Mean acceptance length of speculative decoding (accepted drafts + bonus token per forward)."),
    ("spec_accept_rate", lambda s: s.get("spec_accept_rate", 0.0),
     "Speculative acceptance rate (`accepted drafts / proposed drafts` in batch)."),
    ("num_prefill_bootstrap_queue_reqs", lambda s: s.get("kv_rooms_live", 0) - s.get("kv_rooms_registered", 0),
     "The number of requests in the prefill bootstrap queue."),
    ("num_prefill_inflight_queue_reqs", lambda s: s.get("kv_rooms_registered", 0),
     "The number of requests in the prefill inflight queue."),
    ("num_decode_prealloc_queue_reqs", lambda s: s.get("kv_rooms_prealloc", 0),
     "The number of requests in the decode prealloc queue."),
    ("num_decode_transfer_queue_reqs", lambda s: s.get("kv_rooms_transfer", 0),
     "The number of requests in the decode transfer queue."),
    ("page_size", lambda s: s.get("page_size", 0), "The page size of the KV cache."),
    ("context_len", lambda s: s.get("context_length", 0), "The context length of the model."),
)


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


class _StateCollector(Collector):
    def __init__(self, labels: dict[str, str], stats: Callable[[], dict[str, Any]],
                 cache_hit_rate: Callable[[], float]) -> None:
        self._labels = labels
        self._stats = stats
        self._cache_hit_rate = cache_hit_rate

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        names, values = list(self._labels), list(self._labels.values())
        for name, read, help_text in _STATE_GAUGES:
            family = GaugeMetricFamily("sglang:" + name, help_text, labels=names)
            family.add_metric(values, _number(read(stats)))
            yield family
        family = GaugeMetricFamily("sglang:cache_hit_rate", "The prefix cache hit rate.", labels=names)
        family.add_metric(values, self._cache_hit_rate())
        yield family


class SGLangMetrics:
    """The `sglang:*` series of one server, in the server's own registry."""

    def __init__(self, registry: CollectorRegistry, model_name: str, engine_type: str,
                 stats: Callable[[], dict[str, Any]]) -> None:
        self.labels = {"model_name": model_name, "engine_type": engine_type}
        base = list(self.labels)
        streaming = [*base, "is_streaming"]

        def counter(name: str, doc: str, labels: list[str]) -> Counter:
            return Counter("sglang:" + name, doc, labels, registry=registry)

        def histogram(name: str, doc: str, labels: list[str], buckets: tuple[float, ...]) -> Histogram:
            return Histogram("sglang:" + name, doc, labels, buckets=buckets, registry=registry)

        self.prompt_tokens = counter("prompt_tokens", "Number of prefill tokens processed.", streaming)
        self.generation_tokens = counter("generation_tokens", "Number of generation tokens processed.", streaming)
        self.num_requests = counter("num_requests", "Number of requests processed.", streaming)
        self.cached_tokens = counter("cached_tokens", "Number of cached prompt tokens by source.",
                                     [*base, "cache_source"])
        self.aborted_requests = counter("num_aborted_requests", "Number of requests aborted.", base)
        self.spec_verify_calls = counter("spec_verify_calls", "Number of speculative decoding verification calls.",
                                         base)
        self.time_to_first_token = histogram("time_to_first_token_seconds",
                                             "Histogram of time to first token in seconds.", streaming, _TTFT_BUCKETS)
        self.inter_token_latency = histogram("inter_token_latency_seconds",
                                             "Histogram of inter-token latency in seconds.", base, _ITL_BUCKETS)
        self.time_per_output_token = histogram(
            "request_time_per_output_token_seconds",
            "Per-request TPOT in seconds: (finished_time - first_token_time) / (completion_tokens - 1).",
            streaming, _ITL_BUCKETS)
        self.e2e_latency = histogram("e2e_request_latency_seconds",
                                     "Histogram of End-to-end request latency in seconds", streaming, _E2E_BUCKETS)
        self.queue_time = histogram("queue_time_seconds", "Histogram of queueing time in seconds.", base,
                                    _QUEUE_BUCKETS)
        self.kv_transfer_speed = histogram("kv_transfer_speed_gb_s", "Histogram of KV cache transfer speed in GB/s.",
                                           base, _KV_SPEED_BUCKETS)
        self.kv_transfer_latency = histogram("kv_transfer_latency_ms",
                                             "Histogram of KV cache transfer latency in ms.", base,
                                             _KV_LATENCY_BUCKETS)
        self._prompt_total = 0
        self._cached_total = 0
        # Every series exists from the start, at zero, so dashboards and rate() see them before traffic.
        for metric in (self.aborted_requests, self.spec_verify_calls, self.inter_token_latency, self.queue_time,
                       self.kv_transfer_speed, self.kv_transfer_latency):
            metric.labels(**self.labels)
        for metric in (self.prompt_tokens, self.generation_tokens, self.num_requests, self.time_to_first_token,
                       self.time_per_output_token, self.e2e_latency):
            for stream in (False, True):
                metric.labels(**self._streaming(stream))
        registry.register(_StateCollector(self.labels, stats, self._cache_hit_rate))

    def _cache_hit_rate(self) -> float:
        return _ratio(self._cached_total, self._prompt_total)

    def _streaming(self, stream: bool) -> dict[str, str]:
        return {**self.labels, "is_streaming": "true" if stream else "false"}

    def first_token(self, seconds: float, stream: bool) -> None:
        self.time_to_first_token.labels(**self._streaming(stream)).observe(seconds)

    def tokens(self, interval: float, n: int) -> None:
        """n tokens arrived over `interval` seconds: n observations of interval / n, as SGLang counts them."""
        itl = self.inter_token_latency.labels(**self.labels)
        for _ in range(n):
            itl.observe(interval / n)

    def finished(self, meta: dict[str, Any], stream: bool, e2e: float, tpot: float | None, queue_time: float | None,
                 kv_bytes: int, kv_seconds: float) -> None:
        labels = self._streaming(stream)
        prompt = int(meta.get("prompt_tokens", 0) or 0)
        cached = int(meta.get("cached_tokens", 0) or 0)
        self._prompt_total += prompt
        self._cached_total += cached
        self.prompt_tokens.labels(**labels).inc(prompt)
        self.generation_tokens.labels(**labels).inc(int(meta.get("completion_tokens", 0) or 0))
        self.num_requests.labels(**labels).inc()
        if cached:
            self.cached_tokens.labels(**self.labels, cache_source="total").inc(cached)
        if meta.get("spec_verify_ct"):
            self.spec_verify_calls.labels(**self.labels).inc(int(meta["spec_verify_ct"]))
        reason = meta.get("finish_reason") or {}
        if isinstance(reason, dict) and reason.get("type") == "abort":
            self.aborted_requests.labels(**self.labels).inc()
        self.e2e_latency.labels(**labels).observe(e2e)
        if tpot is not None:
            self.time_per_output_token.labels(**labels).observe(tpot)
        if queue_time is not None:
            self.queue_time.labels(**self.labels).observe(queue_time)
        if kv_seconds > 0:
            self.kv_transfer_latency.labels(**self.labels).observe(kv_seconds * 1e3)
            self.kv_transfer_speed.labels(**self.labels).observe(kv_bytes / kv_seconds / 1e9)
