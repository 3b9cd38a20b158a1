"""Request parsing, bootstrap injection and logprob merging, in-process."""

from __future__ import annotations

import argparse
import itertools
import json
import random

import pytest
from tpla_router.cli import add_router_args, config_from_args
from tpla_router.config import Role, RouterConfig, WorkerSpec
from tpla_router.errors import RouterError
from tpla_router.logprobs import StreamMerger, merge_response, prefill_prompt_logprobs
from tpla_router.protocol import PDRequest, Route, parse_request
from tpla_router.worker import Worker

PREFILL = Worker(WorkerSpec("http://10.1.2.3:30001", Role.PREFILL, 8998), RouterConfig())
RIDS = itertools.count()


def parse(route: Route, body: object, cap: int | None = None):
    return parse_request(route, json.dumps(body).encode(), cap)


def render(pd: PDRequest) -> tuple[bytes, list[str]]:
    """The bytes one attempt sends, joined from the pieces render() hands to the upstream writer."""
    pieces, rids = pd.render(PREFILL, f"rid-{next(RIDS)}")
    return b"".join(pieces), rids


def sent(pd: PDRequest) -> dict:
    return json.loads(render(pd)[0])


def test_single_generate_gets_scalar_bootstrap_fields_and_keeps_everything_else() -> None:
    body = {"text": "hello", "sampling_params": {"max_new_tokens": 5, "temperature": 0.1},
            "custom": {"nested": [1, 2.5, None, "é"]}, "big": 2**70}
    pd = parse(Route.GENERATE, body)
    assert (pd.batch_size, pd.stream, pd.merge_logprobs, pd.routing_key) == (None, False, False, "hello")
    raw, rids = render(pd)
    first = json.loads(raw)
    assert first["bootstrap_host"] == "10.1.2.3" and first["bootstrap_port"] == 8998
    assert isinstance(first["bootstrap_room"], int) and 0 <= first["bootstrap_room"] < 2**63
    assert rids == [first["rid"]]
    assert {k: v for k, v in first.items() if not k.startswith("bootstrap_") and k != "rid"} == body
    again, rids2 = render(pd)
    assert json.loads(again)["bootstrap_room"] != first["bootstrap_room"] and rids2 != rids


@pytest.mark.parametrize("body,size,key", [
    ({"text": ["a", "b", "c"]}, 3, "a"),
    ({"input_ids": [[1, 2], [3], [4, 5, 6]]}, 3, "1,2,"),
    ({"input_ids": [7, 8, 9]}, None, "7,8,9,"),
])
def test_generate_batch_shapes(body: dict, size: int | None, key: str) -> None:
    pd = parse(Route.GENERATE, body)
    assert pd.batch_size == size and pd.routing_key == key
    body_sent = sent(pd)
    if size is None:
        assert isinstance(body_sent["bootstrap_room"], int)
        return
    assert body_sent["bootstrap_host"] == ["10.1.2.3"] * size
    assert body_sent["bootstrap_port"] == [8998] * size
    assert len(set(body_sent["bootstrap_room"])) == size
    assert len(body_sent["rid"]) == size


def test_client_rid_is_kept() -> None:
    pd = parse(Route.GENERATE, {"text": ["a", "b"], "rid": ["x", "y"]})
    raw, rids = render(pd)
    assert json.loads(raw)["rid"] == ["x", "y"] and rids == ["x", "y"]


@pytest.mark.parametrize("route,body,size", [
    (Route.COMPLETIONS, {"prompt": "hi"}, None),
    (Route.COMPLETIONS, {"prompt": ["hi", "yo"]}, 2),
    (Route.COMPLETIONS, {"prompt": [[1, 2], [3]]}, 2),
    (Route.COMPLETIONS, {"prompt": [1, 2, 3]}, None),
    (Route.CHAT, {"messages": [{"role": "user", "content": "hi"}]}, None),
])
def test_openai_shapes(route: Route, body: dict, size: int | None) -> None:
    assert parse(route, body).batch_size == size


def test_chat_key_grows_with_the_conversation() -> None:
    turn1 = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    turn2 = turn1 + [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    k1 = parse(Route.CHAT, {"messages": turn1}).routing_key
    k2 = parse(Route.CHAT, {"messages": turn2}).routing_key
    assert k1 and k2 and k2.startswith(k1) and k2 != k1


@pytest.mark.parametrize("route,body,field", [
    (Route.GENERATE, b"not json", "valid JSON"),
    (Route.GENERATE, [1, 2], "JSON object"),
    (Route.GENERATE, {"text": []}, "text"),
    (Route.GENERATE, {"text": ["a", 3]}, "text"),
    (Route.GENERATE, {"input_ids": []}, "input_ids"),
    (Route.COMPLETIONS, {"prompt": []}, "prompt"),
])
def test_bad_requests_name_the_field(route: Route, body: object, field: str) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(RouterError, match=field) as e:
        parse_request(route, raw, None)
    assert e.value.status == 400


def test_max_new_tokens_cap() -> None:
    assert parse(Route.GENERATE, {"text": "a", "sampling_params": {"max_new_tokens": 64}}, 64)
    with pytest.raises(RouterError, match=r"sampling_params\.max_new_tokens=65"):
        parse(Route.GENERATE, {"text": "a", "sampling_params": {"max_new_tokens": 65}}, 64)
    with pytest.raises(RouterError, match=r"sampling_params\[1\]\.max_new_tokens"):
        parse(Route.GENERATE, {"text": ["a", "b"], "sampling_params": [{}, {"max_new_tokens": 100}]}, 64)
    with pytest.raises(RouterError, match="max_completion_tokens"):
        parse(Route.CHAT, {"messages": [], "max_completion_tokens": 1000}, 64)
    assert "sampling_params" not in sent(parse(Route.GENERATE, {"text": "a"}, 64))
    assert sent(parse(Route.COMPLETIONS, {"prompt": "a"}, 64))["max_tokens"] == 64
    assert sent(parse(Route.COMPLETIONS, {"prompt": "a", "max_tokens": 3}, 64))["max_tokens"] == 3


def test_merge_prepends_prefill_logprobs_per_item() -> None:
    prefill = json.dumps([{"meta_info": {"input_token_logprobs": [[-1, 1, None], [-2, 2, None]]}},
                          {"meta_info": {"input_token_logprobs": [[-3, 3, None]]}}]).encode()
    decode = json.dumps([{"text": "x", "meta_info": {"input_token_logprobs": [[-9, 9, None]]}},
                         {"text": "y", "meta_info": {"input_token_logprobs": []}}]).encode()
    merged = json.loads(merge_response(prefill_prompt_logprobs(prefill), decode))
    assert merged[0]["meta_info"]["input_token_logprobs"] == [[-1, 1, None], [-2, 2, None], [-9, 9, None]]
    assert merged[1]["meta_info"]["input_token_logprobs"] == [[-3, 3, None]]
    assert merged[0]["text"] == "x"


def _sse(events: list[dict]) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def test_stream_merger_is_independent_of_chunk_boundaries() -> None:
    prefill_stream = _sse([{"index": 0, "meta_info": {"input_token_logprobs": [[-1, 5, None]]}},
                           {"index": 1, "meta_info": {"input_token_logprobs": [[-2, 6, None]]}}])
    prefix = prefill_prompt_logprobs(prefill_stream)
    assert prefix == {0: [[-1, 5, None]], 1: [[-2, 6, None]]}
    decode_events = [{"index": i % 2, "text": f"t{i}", "meta_info": {"input_token_logprobs": []}} for i in range(6)]
    stream = _sse(decode_events)
    whole = StreamMerger(prefix)
    reference = whole.feed(stream) + whole.flush()
    expected = [{**e, "meta_info": {"input_token_logprobs": prefix[e["index"]]}} for e in decode_events]
    got = [json.loads(line[6:]) for line in reference.split(b"\n\n") if line.startswith(b"data: {")]
    assert got == expected and reference.endswith(b"data: [DONE]\n\n")
    rng = random.Random(3)
    for _ in range(20):
        merger = StreamMerger(prefix)
        out = b""
        pos = 0
        while pos < len(stream):
            step = rng.randint(1, 40)
            out += merger.feed(stream[pos:pos + step])
            pos += step
        assert out + merger.flush() == reference


def test_cli_flags_build_the_config() -> None:
    parser = argparse.ArgumentParser()
    add_router_args(parser)
    args = parser.parse_args([
        "--prefill", "http://127.0.0.1:1", "9000", "--prefill", "http://127.0.0.1:2", "none",
        "--prefill", "http://127.0.0.1:3/", "--decode", "http://127.0.0.1:4",
        "--policy", "random", "--decode-policy", "power_of_two", "--disable-retries", "--api-key", "s3cret-key",
    ])
    config = config_from_args(args)
    assert [(s.url, s.bootstrap_port) for s in config.prefill] == [
        ("http://127.0.0.1:1", 9000), ("http://127.0.0.1:2", None), ("http://127.0.0.1:3", None)]
    assert [s.url for s in config.decode] == ["http://127.0.0.1:4"]
    assert (config.effective_prefill_policy, config.effective_decode_policy) == ("random", "power_of_two")
    assert config.retry_max_retries == 1 and config.api_key == "s3cret-key" and "s3cret" not in repr(config)
    bad = parser.parse_args(["--prefill", "http://127.0.0.1:1", "port"])
    with pytest.raises(ValueError, match="bootstrap port"):
        config_from_args(bad)


def test_add_router_args_can_leave_common_flags_to_the_caller() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-level", default="warn")
    add_router_args(parser, common=False)
    config = config_from_args(parser.parse_args(["--decode", "http://127.0.0.1:4", "--port", "9"]))
    assert (config.host, config.port, config.log_level) == ("0.0.0.0", 9, "warn")


@pytest.mark.parametrize("kwargs,match", [
    ({"decode": (WorkerSpec("http://x:1", Role.DECODE),) * 2}, "unique"),
    ({"policy": "fastest"}, "policy"),
    ({"cache_threshold": 2.0}, "cache_threshold"),
    ({"retry_max_retries": 0}, "retry_max_retries"),
    ({"api_key": ""}, "api_key"),
])
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RouterConfig(**kwargs)


def test_worker_spec_validation() -> None:
    assert WorkerSpec("http://x:1/", Role.DECODE).url == "http://x:1"
    with pytest.raises(ValueError, match="http"):
        WorkerSpec("ftp://x", Role.DECODE)
    with pytest.raises(ValueError, match="prefill workers only"):
        WorkerSpec("http://x:1", Role.DECODE, 9000)
