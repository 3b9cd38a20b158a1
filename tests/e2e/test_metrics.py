"""Every /metrics of a PD cluster (router, prefill, decode) through prometheus_client's parser, with SGLang's
names on both servers: engine_type labels, the PD queue gauges, KV transfer latency and speed."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    r = httpx.get(url + "/metrics", timeout=30)
    assert r.status_code == 200
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def total(samples: dict, name: str) -> float:
    return sum(value for _, value in samples.get(name, []))


def test_every_metrics_endpoint_parses_and_the_servers_speak_sglang(cluster) -> None:
    before = scrape(cluster.decode_url)
    body = {"text": "def fibonacci(n):", "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}}
    assert httpx.post(cluster.url + "/generate", json=body, timeout=120).status_code == 200
    router, prefill, decode = (scrape(u) for u in (cluster.url, cluster.prefill_url, cluster.decode_url))
    assert router
    for samples, engine_type in ((prefill, "prefill"), (decode, "decode")):
        sglang = [labels for name, entries in samples.items() if name.startswith("sglang:") for labels, _ in entries]
        assert sglang and all(labels["engine_type"] == engine_type for labels in sglang)
        assert all(labels["model_name"] == "mla-tiny" for labels in sglang)
        assert any(name.startswith("tpla_serve_") for name in samples)  # ours stay beside them
    for name in ("sglang:num_prefill_bootstrap_queue_reqs", "sglang:num_prefill_inflight_queue_reqs"):
        assert name in prefill, name
    for name in ("sglang:num_decode_prealloc_queue_reqs", "sglang:num_decode_transfer_queue_reqs"):
        assert name in decode, name
    grew = {name: total(decode, name) - total(before, name) for name in (
        "sglang:kv_transfer_latency_ms_count", "sglang:kv_transfer_speed_gb_s_count",
        "sglang:time_to_first_token_seconds_count", "sglang:generation_tokens_total")}
    assert grew == {"sglang:kv_transfer_latency_ms_count": 1, "sglang:kv_transfer_speed_gb_s_count": 1,
                    "sglang:time_to_first_token_seconds_count": 1, "sglang:generation_tokens_total": 6}
    # The prefill's one token is the decode's first: a prefill server observes no time to first token.
    assert total(prefill, "sglang:time_to_first_token_seconds_count") == 0
    assert total(prefill, "sglang:e2e_request_latency_seconds_count") >= 1
