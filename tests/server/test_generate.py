"""/generate against the in-process Engine on the same model: single, batch, streaming, logprobs."""

from __future__ import annotations

import json

import pytest
from server_procs import ServerProcess

PROMPTS = ["def fibonacci(n):", "The quick brown fox", "import os\nimport sys\n"]
GREEDY = {"max_new_tokens": 12, "temperature": 0.0}


def sse_events(response) -> list:
    """The JSON payloads of an SSE body, then the literal "[DONE]" marker."""
    events = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def same_output(got: dict, ref: dict) -> None:
    assert got["output_ids"] == ref["output_ids"]
    assert got["text"] == ref["text"]
    for key in ("finish_reason", "prompt_tokens", "completion_tokens"):
        assert got["meta_info"][key] == ref["meta_info"][key], key


def test_single_text_equals_engine(server: ServerProcess, engine) -> None:
    r = server.client.post("/generate", json={"text": PROMPTS[0], "sampling_params": GREEDY, "rid": "single"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["meta_info"]["id"] == "single"
    same_output(out, engine.generate(PROMPTS[0], GREEDY))


def test_batch_text_and_input_ids_equal_engine(server: ServerProcess, engine) -> None:
    refs = engine.generate(PROMPTS, GREEDY)
    r = server.client.post("/generate", json={"text": PROMPTS, "sampling_params": GREEDY, "rid": "batch"})
    assert r.status_code == 200, r.text
    outs = r.json()
    assert [o["meta_info"]["id"] for o in outs] == ["batch_0", "batch_1", "batch_2"]
    for got, ref in zip(outs, refs):
        same_output(got, ref)

    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    per_item = [GREEDY, {**GREEDY, "max_new_tokens": 5}, GREEDY]
    refs = engine.generate(input_ids=ids, sampling_params=per_item)
    r = server.client.post("/generate", json={"input_ids": ids, "sampling_params": per_item})
    assert r.status_code == 200, r.text
    for got, ref in zip(r.json(), refs):
        same_output(got, ref)


def test_stream_sends_cumulative_text_then_done(server: ServerProcess, engine) -> None:
    ref = engine.generate(PROMPTS[1], GREEDY)
    body = {"text": PROMPTS[1], "sampling_params": GREEDY, "stream": True}
    with server.client.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    outputs = events[:-1]
    assert len(outputs) >= 2
    for prev, cur in zip(outputs, outputs[1:]):
        assert cur["text"].startswith(prev["text"])
        assert cur["output_ids"][: len(prev["output_ids"])] == prev["output_ids"]
    assert all(o["meta_info"]["finish_reason"] is None for o in outputs[:-1])
    same_output(outputs[-1], ref)


def test_batch_stream_tags_each_event_with_its_prompt(server: ServerProcess, engine) -> None:
    refs = engine.generate(PROMPTS[:2], GREEDY)
    body = {"text": PROMPTS[:2], "sampling_params": GREEDY, "stream": True}
    with server.client.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    finals = {e["index"]: e for e in events[:-1] if e["meta_info"]["finish_reason"] is not None}
    assert sorted(finals) == [0, 1]
    for i, ref in enumerate(refs):
        same_output(finals[i], ref)


def test_logprobs_equal_engine(server: ServerProcess, engine) -> None:
    ids = engine.tokenizer.encode(PROMPTS[2])
    options = {"return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 3}
    ref = engine.generate(input_ids=ids, sampling_params=GREEDY, return_text_in_logprobs=True, **options)
    r = server.client.post("/generate", json={"input_ids": ids, "sampling_params": GREEDY,
                                              "return_text_in_logprobs": True, **options})
    assert r.status_code == 200, r.text
    got, want = r.json()["meta_info"], ref["meta_info"]
    for key in ("input_token_logprobs", "output_token_logprobs"):
        assert len(got[key]) == len(want[key]) > 0
        for g, w in zip(got[key], want[key]):
            assert g[1:] == w[1:]  # token id and its text
            assert (g[0] is None and w[0] is None) or g[0] == pytest.approx(w[0], abs=1e-4)
    for key in ("input_top_logprobs", "output_top_logprobs"):
        assert len(got[key]) == len(want[key])
        for g, w in zip(got[key], want[key]):
            if w is None:
                assert g is None
                continue
            assert [e[1] for e in g] == [e[1] for e in w]
            assert [e[0] for e in g] == pytest.approx([e[0] for e in w], abs=1e-4)
    assert len(got["output_token_logprobs"]) == got["completion_tokens"]
    assert got["output_token_logprobs"][0][2] is not None  # return_text_in_logprobs


def test_integer_bootstrap_room_is_served_by_a_plain_server(server: ServerProcess, engine) -> None:
    """A plain server (no --disaggregation-mode) serves a body carrying PD fields start to finish."""
    room = (1 << 63) - 1
    r = server.client.post("/generate", json={"text": PROMPTS[0], "sampling_params": GREEDY,
                                              "bootstrap_host": "127.0.0.1", "bootstrap_port": None,
                                              "bootstrap_room": room})
    assert r.status_code == 200, r.text
    same_output(r.json(), engine.generate(PROMPTS[0], GREEDY))


def test_streamed_logprobs_come_as_increments_with_cumulative_lengths(server: ServerProcess, engine) -> None:
    """SGLang's streamed meta_info: output logprobs new since the previous event, counts so far; together the
    events carry exactly the logprobs of the answer."""
    options = {"return_logprob": True, "top_logprobs_num": 2, "return_text_in_logprobs": True}
    ref = engine.generate(PROMPTS[0], GREEDY, **options)["meta_info"]
    body = {"text": PROMPTS[0], "sampling_params": GREEDY, "stream": True, **options}
    with server.client.stream("POST", "/generate", json=body) as r:
        events = sse_events(r)[:-1]
    assert len(events) > 1
    seen = 0
    for e in events:
        meta = e["meta_info"]
        assert meta["output_token_logprobs_length"] == meta["completion_tokens"] == len(e["output_ids"])
        assert len(meta["output_token_logprobs"]) == len(meta["output_top_logprobs"]) == meta["completion_tokens"] - seen
        seen = meta["completion_tokens"]
    joined = [entry for e in events for entry in e["meta_info"]["output_token_logprobs"]]
    assert [x[1:] for x in joined] == [x[1:] for x in ref["output_token_logprobs"]]
    assert [x[0] for x in joined] == pytest.approx([x[0] for x in ref["output_token_logprobs"]], abs=1e-4)
