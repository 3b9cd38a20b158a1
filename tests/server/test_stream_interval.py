"""--stream-interval (SGLang's): a streamed answer sends its first token at once, then one chunk per N
tokens, and the chunks together still carry every token and logprob of the unstreamed answer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_procs import ServerProcess

BODY = {"text": "def fibonacci(n):", "sampling_params": {"max_new_tokens": 11, "temperature": 0.0,
                                                         "ignore_eos": True}, "return_logprob": True}


@pytest.fixture(scope="module")
def interval_server(chat_model_dir: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(chat_model_dir, "--stream-interval", "4", "--skip-server-warmup")
    try:
        proc.wait_healthy()
        yield proc
    finally:
        proc.stop()


def test_chunks_come_every_interval_tokens(interval_server: ServerProcess) -> None:
    whole = interval_server.client.post("/generate", json=BODY).json()
    with interval_server.client.stream("POST", "/generate", json={**BODY, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    counts = [c["meta_info"]["completion_tokens"] for c in chunks]
    assert counts == [1, 5, 9, 11]
    assert chunks[-1]["text"] == whole["text"] and chunks[-1]["output_ids"] == whole["output_ids"]
    streamed = [entry for c in chunks for entry in c["meta_info"]["output_token_logprobs"]]
    assert [t for _, t, _ in streamed] == [t for _, t, _ in whole["meta_info"]["output_token_logprobs"]]


def test_the_interval_must_be_positive(chat_model_dir: Path) -> None:
    proc = ServerProcess(chat_model_dir, "--stream-interval", "0")
    assert proc.proc.wait(120) != 0
