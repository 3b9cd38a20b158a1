"""Health, model and server info (no secrets), cache flush, /metrics (ours and SGLang's names, read with
prometheus_client's parser) and the OpenAPI schema."""

from __future__ import annotations

import threading
import time

from prometheus_client.parser import text_string_to_metric_families
from server_procs import ServerProcess


def test_health_generate_runs_a_real_generation(server: ServerProcess) -> None:
    before = server.stats()["generated_tokens"]
    r = server.client.get("/health_generate")
    assert r.status_code == 200, r.text
    assert server.stats()["generated_tokens"] == before + 1


def test_model_info_routes_agree(server: ServerProcess, chat_model_dir, engine) -> None:
    a = server.client.get("/model_info").json()
    b = server.client.get("/get_model_info").json()
    assert a == b
    assert a["model_path"] == str(chat_model_dir)
    assert a["is_generation"] is True
    assert a["vocab_size"] == engine.runner.model_config.vocab_size
    assert a["context_length"] == engine.runner.context_length
    models = server.client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [chat_model_dir.name]


def test_server_info_shows_flags_and_scheduler_state_without_secrets(server: ServerProcess, engine) -> None:
    info = server.client.get("/server_info").json()
    alias = server.client.get("/get_server_info").json()
    assert {k: v for k, v in info.items() if k != "internal_states"} == {
        k: v for k, v in alias.items() if k != "internal_states"}
    assert "api_key" not in info and "disaggregation_secret" not in info and server.api_key not in str(info)
    assert info["role"] == "decode" and info["port"] == server.port
    assert info["served_model_name"] == server.model_dir.name  # what sglang-router lists the model as
    state = info["internal_states"][0]
    assert state["pages_used"] + state["pages_free"] == engine.scheduler.stats().pages_free
    assert state["page_size"] == engine.scheduler.page_size


def test_prefix_cache_hits_and_flush(server: ServerProcess) -> None:
    body = {"text": "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)",
            "sampling_params": {"max_new_tokens": 2, "temperature": 0.0}}
    first = server.client.post("/generate", json=body).json()
    again = server.client.post("/generate", json=body).json()
    assert again["output_ids"] == first["output_ids"]
    assert again["meta_info"]["cached_tokens"] > 0
    assert again["meta_info"]["cached_tokens"] < again["meta_info"]["prompt_tokens"]
    assert server.stats()["radix_cache_pages"] > 0
    for method in ("GET", "POST"):
        r = server.client.request(method, "/flush_cache")
        assert r.status_code == 200, r.text
        assert r.json()["success"] is True
    assert server.stats()["radix_cache_pages"] == 0
    assert server.client.post("/generate", json=body).json()["meta_info"]["cached_tokens"] == 0


def test_flush_cache_is_refused_while_a_request_runs(server: ServerProcess) -> None:
    # The scheduler decodes this model far faster than the front streams, so the request is held in the
    # scheduler by its length alone: flush while the server says it runs; a try it finished first is redone.
    for attempt in range(5):
        rid = f"long-running-{attempt}"
        body = {"text": "def f(x):", "rid": rid,
                "sampling_params": {"max_new_tokens": 1000, "temperature": 0.0, "ignore_eos": True}}
        answer = threading.Thread(target=server.client.post, args=("/generate",), kwargs={"json": body})
        answer.start()
        while server.stats()["num_running"] + server.stats()["num_waiting"] == 0 and answer.is_alive():
            time.sleep(0.005)
        refused = server.client.post("/flush_cache")
        server.client.post("/abort_request", json={"rid": rid})
        answer.join()
        if refused.status_code != 200:
            break
    assert refused.status_code == 400, refused.text
    assert "running" in refused.json()["error"]["message"]
    server.wait_idle(server.stats()["pages_free"] + server.stats()["pages_used"])
    assert server.client.post("/flush_cache").status_code == 200


def scrape(server: ServerProcess) -> dict[str, dict[tuple, float]]:
    """/metrics through prometheus_client's own parser: sample name -> {sorted labels: value}."""
    r = server.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def one(samples: dict[str, dict[tuple, float]], name: str, **labels: str) -> float:
    matches = [v for k, v in samples[name].items() if set(labels.items()) <= set(k)]
    assert len(matches) == 1, (name, labels, samples[name])
    return matches[0]


def test_metrics_ours_and_sglangs(server: ServerProcess) -> None:
    body = {"text": "def f(x):", "sampling_params": {"max_new_tokens": 3, "temperature": 0.0}, "stream": True}
    with server.client.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200
        r.read()
    samples = scrape(server)
    for name in ("num_queue_reqs", "num_running_reqs", "kv_pages_used", "kv_pages_free", "generation_tokens_total",
                 "time_to_first_token_seconds_bucket", "time_per_output_token_seconds_bucket",
                 "e2e_request_latency_seconds_count", "kv_transfer_bytes_total", "kv_transfer_seconds_total",
                 "http_requests_total", "gen_throughput", "cached_tokens_total", "cache_hit_rate",
                 "radix_cache_pages"):
        assert "tpla_serve_" + name in samples, name
    stats = server.stats()
    assert one(samples, "tpla_serve_kv_pages_free") == stats["pages_free"]
    assert one(samples, "tpla_serve_time_to_first_token_seconds_count") >= 1
    assert one(samples, "tpla_serve_http_requests_total", code="200", route="/generate") >= 1
    for name in ("prompt_tokens_total", "generation_tokens_total", "num_requests_total", "num_running_reqs",
                 "num_queue_reqs", "token_usage", "num_used_tokens", "max_total_num_tokens", "gen_throughput",
                 "cache_hit_rate", "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                 "e2e_request_latency_seconds_bucket", "queue_time_seconds_bucket", "spec_accept_length",
                 "spec_accept_rate", "num_prefill_bootstrap_queue_reqs", "num_decode_transfer_queue_reqs",
                 "kv_transfer_latency_ms_bucket", "kv_transfer_speed_gb_s_bucket"):
        assert "sglang:" + name in samples, name
        for labels in samples["sglang:" + name]:
            assert ("model_name", server.model_dir.name) in labels and ("engine_type", "unified") in labels
    assert one(samples, "sglang:max_total_num_tokens") == stats["max_total_tokens"]
    assert one(samples, "sglang:num_requests_total", is_streaming="true") >= 1


def test_latencies_are_recorded_for_requests_answered_at_once(server: ServerProcess) -> None:
    before = scrape(server)
    body = {"text": "import os", "sampling_params": {"max_new_tokens": 5, "temperature": 0.0, "ignore_eos": True}}
    assert server.client.post("/generate", json=body).status_code == 200
    after = scrape(server)

    def grew(name: str, **labels: str) -> float:
        return one(after, name, **labels) - (one(before, name, **labels) if name in before and any(
            set(labels.items()) <= set(k) for k in before[name]) else 0.0)

    assert grew("tpla_serve_time_to_first_token_seconds_count") == 1
    assert grew("tpla_serve_time_per_output_token_seconds_count") == 1
    assert grew("sglang:time_to_first_token_seconds_count", is_streaming="false") == 1
    assert grew("sglang:inter_token_latency_seconds_count") == 4  # the 4 tokens after the first
    assert grew("sglang:generation_tokens_total", is_streaming="false") == 5
    assert grew("sglang:queue_time_seconds_count") == 1
    assert grew("sglang:e2e_request_latency_seconds_count", is_streaming="false") == 1


def test_openapi_describes_the_request_models(server: ServerProcess) -> None:
    spec = server.client.get("/openapi.json").json()
    for path in ("/generate", "/v1/completions", "/v1/chat/completions", "/abort_request"):
        assert path in spec["paths"], path
    schemas = spec["components"]["schemas"]
    assert "bootstrap_room" in schemas["GenerateReqInput"]["properties"]
    assert "messages" in schemas["ChatCompletionRequest"]["properties"]
