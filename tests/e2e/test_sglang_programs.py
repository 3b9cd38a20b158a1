"""SGLang's own frontend test programs (`sglang/test/test_programs.py`, shipped in the sglang package) against
`--role all`, as SGLang's suite runs them against its own server (answers unchecked where the program
allows: a tiny model's answers are not a real model's).

Not run here: few_shot_qa, react and tool_use check the answer's content; image_qa needs an image model;
the constrained-decoding programs (regex, dtype_gen, decode_json_regex, and decode_int and decode_json
without their answer checks) run in test_constrained_http.py; completion_speculative and chat_completion_speculative test API speculative execution, a feature of
SGLang's OpenAI backend (which needs tiktoken's downloaded encodings): against a RuntimeEndpoint the
first fails and the second ends in a frontend error it never checks.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sglang as sgl
from cluster import Cluster
from sglang.test import test_programs

MODEL = str(Path(__file__).resolve().parents[2] / "models" / "mla-tiny")
PROGRAMS = [
    ("test_mt_bench", {}),
    ("test_select", {"check_answer": False}),
    ("test_expert_answer", {"check_answer": False}),
    ("test_parallel_decoding", {}),
    ("test_parallel_encoding", {"check_answer": False}),
    ("test_stream", {}),
    ("test_stream_logprobs", {}),
    ("test_gen_min_new_tokens", {}),
]


@pytest.fixture(scope="module")
def default_backend(cluster) -> Iterator[None]:
    """What SGLang's suite sets: an `sgl.Runtime`, here a handle on our router (programs read `.endpoint`)."""
    previous = sgl.global_config.default_backend
    sgl.set_default_backend(types.SimpleNamespace(endpoint=sgl.RuntimeEndpoint(cluster.url)))
    yield
    sgl.set_default_backend(previous)


@pytest.fixture
def hf_tokenizer_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    """gen_min_new_tokens loads the tokenizer with sglang.srt's loader, which needs the SGLang server's own
    dependencies (torchvision); it wraps transformers' AutoTokenizer, which is what it gets here."""
    from transformers import AutoTokenizer

    loader = types.ModuleType("sglang.srt.utils.hf_transformers_utils")
    loader.get_tokenizer = lambda path, **kwargs: AutoTokenizer.from_pretrained(path)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, loader.__name__, loader)


@pytest.mark.timeout(180)  # the frontend hangs on some server errors (a failed join): fail, don't hang
@pytest.mark.parametrize(("name", "kwargs"), PROGRAMS, ids=[name for name, _ in PROGRAMS])
def test_sglang_program(default_backend: None, hf_tokenizer_loader: None, name: str, kwargs: dict) -> None:
    program = getattr(test_programs, name)
    if name != "test_stream_logprobs":
        program(**kwargs)
        return
    # The program reads only the newest chunk's meta_info when two chunks arrive before its consumer thread
    # wakes (text_async_iter in sglang/lang/interpreter.py), so a chunk's logprobs go unseen when chunks come
    # faster than a loaded machine wakes that thread. It runs against a cluster that streams a chunk per 4
    # tokens (--stream-interval 4), as a deployment streaming to slow clients would; the contract itself is
    # checked chunk by chunk over the raw stream in tests/server/test_generate.py. Three tries tell that
    # race from a real failure.
    with _backend(Cluster(MODEL, decode_args="--stream-interval 4")):
        for attempt in range(3):
            try:
                program()
                return
            except AssertionError:
                if attempt == 2:
                    raise


@contextmanager
def _backend(cluster: Cluster) -> Iterator[None]:
    previous = sgl.global_config.default_backend
    sgl.set_default_backend(types.SimpleNamespace(endpoint=sgl.RuntimeEndpoint(cluster.url)))
    try:
        yield
    finally:
        sgl.set_default_backend(previous)
        cluster.stop()
