"""Prometheus metrics of one server, in a registry of its own (never the process-global one).

Latencies are measured in the front for every request, streamed or not: end-to-end on the front's
clock; time to first token from the scheduler's first-token time (CLOCK_MONOTONIC, which both processes
read on one host); inter-token latency from the arrival of each streamed chunk, or for a request answered
once, over its decode (first token to finish). A PD prefill server's one token is the decode server's
first, so it observes neither (as SGLang). Scheduler state (queue, running requests, KV pages, token and
KV-transfer counters) is read from the scheduler's latest Stats at scrape time. With --enable-metrics the
same observations also feed SGLang's names (sglang_metrics.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tpla_serve.config import ServerConfig
from tpla_serve.server.messages import RequestOutput
from tpla_serve.server.sglang_metrics import SGLangMetrics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "tpla_serve_"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0,
                    320.0, 640.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                 0.3, 0.5, 1.0, 2.5)

# Scheduler Stats keys (the first present wins) -> metric name, kind, help. Absent keys read as 0:
# a plain server transfers no KV.
STATS_METRICS: tuple[tuple[tuple[str, ...], str, str, str], ...] = (
    (("num_waiting",), "num_queue_reqs", "gauge", "Requests waiting in the scheduler's queue"),
    (("num_running",), "num_running_reqs", "gauge", "Requests in the running batch"),
    (("pages_used",), "kv_pages_used", "gauge", "KV cache pages in use"),
    (("pages_free",), "kv_pages_free", "gauge", "KV cache pages free"),
    (("generated_tokens",), "generation_tokens", "counter", "Tokens generated"),
    (("prompt_tokens",), "prompt_tokens", "counter", "Prompt tokens received"),
    (("gen_throughput",), "gen_throughput", "gauge", "Tokens generated per second over the last seconds"),
    (("cached_prompt_tokens",), "cached_tokens", "counter", "Prompt tokens whose KV came from the prefix cache"),
    (("cache_hit_rate",), "cache_hit_rate", "gauge", "Prefix cache hits: cached / all prompt tokens"),
    (("radix_cache_pages",), "radix_cache_pages", "gauge", "KV pages the prefix cache holds"),
    (("kv_transfer_bytes", "kv_transfer_bytes_sent"), "kv_transfer_bytes", "counter",
     "Bytes of KV cache received (decode) or sent (prefill) for PD requests"),
    (("kv_transfer_seconds",), "kv_transfer_seconds", "counter", "Seconds spent receiving KV cache (PD)"),
    (("kv_transfer_draft_bytes",), "kv_transfer_draft_bytes", "counter",
     "Of kv_transfer_bytes, the draft model's KV (PD with speculative decoding)"),
    (("spec_verify_steps",), "spec_verify_steps", "counter", "Speculative decoding: batched verification steps run"),
    (("spec_verified_blocks",), "spec_verified_blocks", "counter",
     "Speculative decoding: requests' draft blocks verified"),
    (("spec_proposed_drafts",), "spec_proposed_drafts", "counter", "Speculative decoding: draft tokens proposed"),
    (("spec_accepted_drafts",), "spec_accepted_drafts", "counter", "Speculative decoding: draft tokens accepted"),
    (("spec_accept_rate",), "spec_accept_rate", "gauge", "Speculative decoding: accepted / proposed draft tokens"),
    (("spec_accept_length",), "spec_accept_length", "gauge",
     "Speculative decoding: mean tokens a request's verified block emits"),
    (("spec_draft_seconds",), "spec_draft_seconds", "counter",
     "Speculative decoding: seconds drafting (bonus calibration + draft steps); / spec_verify_steps per step"),
    (("spec_verify_seconds",), "spec_verify_seconds", "counter",
     "Speculative decoding: seconds in the target's block forward and verification"),
)


class _StatsCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        for keys, name, kind, help_text in STATS_METRICS:
            value = next((stats[k] for k in keys if k in stats), 0)
            value = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            yield family(PREFIX + name, help_text, value=value)


@dataclass
class RequestTrack:
    """What the metrics remember of one scheduler request between its answers (front clock, monotonic)."""

    arrival: float
    stream: bool
    first_token: float | None = None  # when its first token was sampled
    last_time: float = 0.0  # when the tokens counted so far arrived
    last_tokens: int = 0


class ServerMetrics:
    def __init__(self, config: ServerConfig, stats: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(PREFIX + "http_requests", "HTTP requests answered, by route and status code",
                                ["route", "code"], registry=self.registry)
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds", "Arrival to the first output token",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.time_per_output_token = Histogram(
            PREFIX + "time_per_output_token_seconds",
            "(last token - first token) / (output tokens - 1), per request",
            buckets=_TPOT_BUCKETS, registry=self.registry)
        self.e2e_latency = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to the last output",
                                     buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_StatsCollector(stats))
        self.sglang = (SGLangMetrics(self.registry, config.model_name, config.engine_type, stats)
                       if config.enable_metrics else None)
        self._latencies = config.engine_type != "prefill"

    def on_output(self, track: RequestTrack, msg: RequestOutput, now: float) -> None:
        """Observe one answer of a request: its first token, the tokens since the last answer, its end."""
        meta = msg.output.get("meta_info", {})
        tokens = int(meta.get("completion_tokens", 0) or 0)
        aborted = (meta.get("finish_reason") or {}).get("type") == "abort"
        if self._latencies and tokens and not aborted:
            self._observe_tokens(track, msg, tokens, now)
        if not msg.finished:
            return
        e2e = now - track.arrival
        self.e2e_latency.observe(e2e)
        tpot = None
        if self._latencies and track.first_token is not None and tokens > 1 and not aborted:
            tpot = (now - track.first_token) / (tokens - 1)
            self.time_per_output_token.observe(tpot)
        if self.sglang is not None:
            self.sglang.finished(meta, track.stream, e2e, tpot, msg.queue_time, msg.kv_transfer_bytes,
                                 msg.kv_transfer_seconds)

    def _observe_tokens(self, track: RequestTrack, msg: RequestOutput, tokens: int, now: float) -> None:
        if track.first_token is None:
            first = msg.first_token_time if msg.first_token_time is not None else now
            track.first_token, track.last_time, track.last_tokens = first, first, 1
            self.time_to_first_token.observe(first - track.arrival)
            if self.sglang is not None:
                self.sglang.first_token(first - track.arrival, track.stream)
        new = tokens - track.last_tokens
        if new > 0:
            if self.sglang is not None:
                self.sglang.tokens(now - track.last_time, new)
            track.last_time, track.last_tokens = now, tokens

    def render(self) -> bytes:
        return generate_latest(self.registry)
