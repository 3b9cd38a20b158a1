"""Bad input gets a 4xx whose message names the problem, and the server keeps serving."""

from __future__ import annotations

import json

import httpx
import pytest
from server_procs import MAX_BODY_BYTES, ServerProcess

OK = {"max_new_tokens": 2, "temperature": 0.0}


def assert_serving(server: ServerProcess) -> None:
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    r = server.client.post("/generate", json={"input_ids": [5, 6, 7], "sampling_params": OK})
    assert r.status_code == 200, r.text
    assert r.json()["meta_info"]["completion_tokens"] == 2


def error_message(r: httpx.Response) -> str:
    body = r.json()
    assert set(body) == {"error"}, body
    return body["error"]["message"]


BAD_BODIES = [
    pytest.param("/generate", b'{"text": "def f(x):", ', "malformed JSON", id="malformed-json"),
    pytest.param("/generate", b"[1, 2]", "JSON object", id="not-an-object"),
    pytest.param("/generate", {"text": 5}, "text", id="text-not-string"),
    pytest.param("/generate", {"input_ids": [1, 2.5]}, "input_ids", id="float-token-id"),
    pytest.param("/generate", {"input_ids": [1, 99999]}, "99999", id="token-id-outside-vocab"),
    pytest.param("/generate", {"input_ids": [1, -3]}, "-3", id="negative-token-id"),
    pytest.param("/generate", {"input_ids": []}, "empty", id="empty-prompt"),
    pytest.param("/generate", {"text": "a", "input_ids": [1]}, "exactly one", id="text-and-ids"),
    pytest.param("/generate", {"text": "a", "sampling_params": {"temprature": 0.5}}, "temprature",
                 id="unknown-sampling-field"),
    pytest.param("/generate", {"text": "a", "sampling_params": {"max_new_tokens": "8"}}, "max_new_tokens",
                 id="sampling-field-type"),
    pytest.param("/generate", {"text": "a", "sampling_params": {"top_p": 2.0}}, "top_p", id="top-p-range"),
    pytest.param("/generate", {"text": "a", "return_logprob": "yes"}, "return_logprob", id="bool-as-string"),
    pytest.param("/generate", {"input_ids": [5] * 1500}, "context length", id="prompt-too-long"),
    pytest.param("/generate", {"input_ids": [5] * 1000, "sampling_params": {"max_new_tokens": 100}},
                 "max_new_tokens", id="no-room-for-new-tokens"),
    pytest.param("/generate", {"text": "a", "bootstrap_host": "127.0.0.1", "bootstrap_room": 12.0},
                 "bootstrap_room", id="float-room"),
    pytest.param("/generate", {"text": "a", "bootstrap_host": "127.0.0.1", "bootstrap_room": "12"},
                 "bootstrap_room", id="string-room"),
    pytest.param("/generate", {"text": "a", "bootstrap_host": "127.0.0.1", "bootstrap_room": 1 << 63},
                 "bootstrap_room", id="room-over-63-bits"),
    pytest.param("/generate", {"text": ["a", "b"], "bootstrap_host": "127.0.0.1", "bootstrap_room": 7},
                 "bootstrap_room", id="one-room-for-a-batch"),
    pytest.param("/generate", {"text": ["a", "b"], "sampling_params": [OK]}, "sampling_params",
                 id="batch-list-length"),
    pytest.param("/v1/completions", {"prompt": "a", "max_tokens": "many"}, "max_tokens", id="openai-type"),
    pytest.param("/v1/completions", {"prompt": "a", "n": 0}, "n must be an integer in [1, 128]", id="openai-n-zero"),
    pytest.param("/generate", {"text": "a", "sampling_params": {"n": 129}}, "n must be", id="n-too-many"),
    pytest.param("/generate", {"text": ["a", "b"], "sampling_params": [{"n": 2}, {"n": 3}]}, "same number",
                 id="n-differs-in-a-batch"),
    pytest.param("/generate", {"text": "a", "sampling_params": {"n": 2}, "bootstrap_host": "127.0.0.1",
                               "bootstrap_room": [1, 2, 3]}, "bootstrap_room", id="n-rooms-count"),
    pytest.param("/v1/chat/completions", {"model": "m"}, "messages", id="chat-without-messages"),
    pytest.param("/generate", b'{"text": "\\ud800abc"}', "lone surrogate", id="surrogate-text"),
    pytest.param("/generate", b'{"text": "a", "sampling_params": {"stop": ["\\udc00"]}}', "lone surrogate",
                 id="surrogate-stop"),
    pytest.param("/generate", b'{"text": "a", "rid": "\\ud83d"}', "lone surrogate", id="surrogate-rid"),
    pytest.param("/v1/completions", b'{"prompt": "\\ud800"}', "lone surrogate", id="surrogate-prompt"),
    pytest.param("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
                 "lone surrogate", id="surrogate-chat"),
    pytest.param("/generate", b"[" * 30_000 + b"]" * 30_000, "parsing the body", id="deep-json"),
    pytest.param("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "temperature": -1},
                 "temperature must be >= 0", id="chat-sampling-range"),
]


@pytest.mark.parametrize(("path", "body", "named"), BAD_BODIES)
def test_bad_input_is_a_4xx_naming_the_problem(server: ServerProcess, path: str, body, named: str) -> None:
    if isinstance(body, bytes):
        r = server.client.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = server.client.post(path, json=body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert named in error_message(r)
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_oversized_body_is_413(server: ServerProcess) -> None:
    big = json.dumps({"text": "x" * (MAX_BODY_BYTES + 1)}).encode()
    r = server.client.post("/generate", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert "max-body-bytes" in error_message(r)

    def chunked():  # no Content-Length: the limit must hold while reading
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    r = server.client.post("/generate", content=chunked(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert_serving(server)


def test_api_key_guards_every_route_but_health(server: ServerProcess) -> None:
    bare = httpx.Client(base_url=server.url, timeout=30)
    try:
        assert bare.get("/health").status_code == 200
        for method, path in [("POST", "/generate"), ("GET", "/v1/models"), ("GET", "/metrics"),
                             ("GET", "/server_info"), ("POST", "/abort_request"), ("GET", "/openapi.json")]:
            r = bare.request(method, path, json={"rid": "x"} if method == "POST" else None)
            assert r.status_code == 401, (path, r.text)
            assert "API key" in error_message(r)
        r = bare.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
    finally:
        bare.close()


def test_unknown_route_is_a_json_404(server: ServerProcess) -> None:
    r = server.client.get("/no_such_route")
    assert r.status_code == 404
    assert error_message(r)


def test_server_serves_after_bad_input(server: ServerProcess) -> None:
    assert_serving(server)
