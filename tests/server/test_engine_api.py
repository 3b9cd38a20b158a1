"""The offline Engine as `sglang.Engine`: async_generate (and streamed), streamed batches, logprob increments,
model and server info without secrets, flush_cache, SGLang's keyword arguments, and shutdown at TP=1 and 2."""

from __future__ import annotations

import asyncio

import pytest

from tpla_serve import Engine

PROMPTS = ["def fibonacci(n):", "The quick brown fox", "import os\n"]
GREEDY = {"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": True}


def test_async_generate_runs_concurrently_and_equals_generate(engine) -> None:
    want = [engine.generate(p, GREEDY)["output_ids"] for p in PROMPTS]

    async def main() -> list:
        single = [engine.async_generate(p, GREEDY) for p in PROMPTS]
        batch = engine.async_generate(PROMPTS, GREEDY)
        return await asyncio.gather(*single, batch)

    *singles, batch = asyncio.run(main())
    assert [o["output_ids"] for o in singles] == want == [o["output_ids"] for o in batch]
    assert not engine.scheduler.requests


def test_async_stream_is_cumulative(engine) -> None:
    want = engine.generate(PROMPTS[0], GREEDY)

    async def main() -> list:
        return [chunk async for chunk in await engine.async_generate(PROMPTS[0], GREEDY, stream=True)]

    chunks = asyncio.run(main())
    assert len(chunks) == GREEDY["max_new_tokens"]
    assert all(b["text"].startswith(a["text"]) for a, b in zip(chunks, chunks[1:]))
    assert chunks[-1]["output_ids"] == want["output_ids"] and chunks[-1]["text"] == want["text"]


def test_a_batch_streams_chunks_tagged_with_their_prompt(engine) -> None:
    want = engine.generate(PROMPTS, GREEDY, return_logprob=True)
    chunks = list(engine.generate(PROMPTS, GREEDY, stream=True, return_logprob=True))
    assert {c["index"] for c in chunks} == {0, 1, 2}
    for i, ref in enumerate(want):
        mine = [c for c in chunks if c["index"] == i]
        assert mine[-1]["output_ids"] == ref["output_ids"] and mine[-1]["meta_info"]["finish_reason"]
        seen = 0
        for c in mine:  # logprobs as increments, lengths so far
            meta = c["meta_info"]
            assert meta["output_token_logprobs_length"] == meta["completion_tokens"]
            assert len(meta["output_token_logprobs"]) == meta["completion_tokens"] - seen
            seen = meta["completion_tokens"]
        joined = [e[1] for c in mine for e in c["meta_info"]["output_token_logprobs"]]
        assert joined == [e[1] for e in ref["meta_info"]["output_token_logprobs"]]
    assert not engine.scheduler.requests


def test_model_info_and_flush_cache(engine, chat_model_dir) -> None:
    info = engine.get_model_info()
    assert info["model_path"] == str(chat_model_dir) and info["served_model_name"] == chat_model_dir.name
    assert info["is_generation"] is True and info["context_length"] == engine.runner.context_length
    assert engine.flush_cache()["success"] is True


@pytest.mark.parametrize(("kwargs", "error", "said"), [
    ({"dp_size": 2}, ValueError, "--dp-size 2"),
    ({"nnodes": 2, "tp_size": 2}, ValueError, "--dist-init-addr"),
    ({"disaggregation_transfer_backend": "nixl"}, ValueError, "zmq"),
    ({"port": 30001}, ValueError, "HTTP server"),
    ({"kv_cache_dtype": "fp8_e4m3"}, ValueError, "--kv-cache-dtype fp8_e4m3"),
    ({"log_level": "loud"}, ValueError, "log_level"),
    ({"no_such_option": 1}, TypeError, "no_such_option"),
])
def test_sglang_keyword_arguments_are_checked_before_anything_loads(kwargs: dict, error: type, said: str) -> None:
    with pytest.raises(error, match=said):
        Engine(**kwargs)


@pytest.mark.parametrize("tp_size", [1, 2])
def test_after_shutdown_every_call_says_the_engine_is_shut_down(chat_model_dir, tp_size: int) -> None:
    engine = Engine(model_path=str(chat_model_dir), tp_size=tp_size, kv_cache_bytes=16 << 20, log_level="warning",
                    trust_remote_code=True, disaggregation_secret="s3cret-cluster")
    try:
        info = engine.get_server_info()
        assert "s3cret" not in repr(info) and "disaggregation_secret" not in info and info["tp_size"] == tp_size
        assert len(engine.generate(PROMPTS[0], GREEDY)["output_ids"]) == GREEDY["max_new_tokens"]
        stream = engine.generate(PROMPTS[0], GREEDY, stream=True)
        next(stream)
    finally:
        engine.shutdown()
    calls = [lambda: engine.generate(PROMPTS[0], GREEDY), lambda: next(stream), engine.get_server_info,
             engine.get_model_info, engine.flush_cache, lambda: engine.abort("x"),
             lambda: asyncio.run(engine.async_generate(PROMPTS[0], GREEDY))]
    for call in calls:
        with pytest.raises(RuntimeError, match="the engine is shut down"):
            call()
    engine.shutdown()  # again: nothing left to stop
