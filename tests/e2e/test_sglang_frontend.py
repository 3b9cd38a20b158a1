"""SGLang frontend programs (the real `sglang` package) through our PD router against our servers."""

from __future__ import annotations

import time

import httpx
import pytest
import sglang as sgl


@pytest.fixture(scope="module")
def backend(cluster):
    return sgl.RuntimeEndpoint(cluster.url)


@sgl.function
def complete(s, prompt):
    s += prompt
    s += sgl.gen("body", max_tokens=16, temperature=0)


@sgl.function
def choose(s, prompt):
    s += prompt
    s += sgl.select("word", choices=["return", "import", "class"])


@sgl.function
def branches(s, prompt):
    s += prompt
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += f" # variant {i}\n"
        f += sgl.gen("code", max_tokens=8, temperature=0)
    forks.join()
    s += "\n" + forks[0]["code"] + forks[1]["code"]


@sgl.function
def chat(s, question):
    s += sgl.system("You write Python.")
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=12, temperature=0))
    s += sgl.user("And shorter?")
    s += sgl.assistant(sgl.gen("answer2", max_tokens=8, temperature=0))


def test_gen_equals_direct_generate(backend, tpla_engine):
    state = complete.run(prompt="def fibonacci(n):", backend=backend)
    want = tpla_engine.generate("def fibonacci(n):", {"max_new_tokens": 16, "temperature": 0})["text"]
    assert state["body"] == want


def test_streaming_gen(backend):
    state = complete.run(prompt="import os\n", backend=backend, stream=True)
    pieces = list(state.text_iter("body"))
    assert "".join(pieces) == state["body"] and len(pieces) > 1


def test_select_picks_the_most_likely_choice(backend, tpla_engine):
    state = choose.run(prompt="def f(x):\n    ", backend=backend)
    assert state["word"] in ("return", "import", "class")
    # The same decision from the engine's own prompt logprobs (mean over each choice's tokens).
    scores = {}
    prefix = tpla_engine.tokenizer.encode("def f(x):\n    ")
    for choice in ("return", "import", "class"):
        ids = tpla_engine.tokenizer.encode("def f(x):\n    " + choice)
        out = tpla_engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                                   logprob_start_len=max(len(prefix) - 2, 0))
        lps = [t[0] for t in out["meta_info"]["input_token_logprobs"] if t[0] is not None]
        scores[choice] = sum(lps) / len(lps)
    assert scores[state["word"]] == pytest.approx(max(scores.values()), abs=1e-3)


def test_fork_join(backend, tpla_engine):
    state = branches.run(prompt="def add(a, b):", backend=backend)
    params = {"max_new_tokens": 8, "temperature": 0}
    want = [tpla_engine.generate(f"def add(a, b): # variant {i}\n", params)["text"] for i in range(2)]
    assert state.text() == "def add(a, b):\n" + want[0] + want[1]  # each fork ran its own branch


def test_run_batch(backend):
    states = complete.run_batch([{"prompt": "def a():"}, {"prompt": "class B:"}, {"prompt": "import re"}],
                                backend=backend)
    assert len(states) == 3 and all(isinstance(s["body"], str) for s in states)


def test_multi_turn_chat(backend):
    state = chat.run(question="How do I reverse a list?", backend=backend)
    assert isinstance(state["answer"], str) and isinstance(state["answer2"], str)
    assert len(state.messages()) == 5


def _prefill_cached_tokens(cluster, at_least: int = 0) -> int:
    """The prefill server's cached prompt tokens, once they reach at_least (within 30 s): the router answers
    a request for no new tokens without waiting for the prefill to have run it."""
    deadline = time.monotonic() + 30
    while True:
        cached = httpx.get(cluster.prefill_url + "/server_info").json()["internal_states"][0]["cached_prompt_tokens"]
        if cached >= at_least or time.monotonic() > deadline:
            return cached
        time.sleep(0.05)


def test_fork_and_select_take_the_shared_prefix_from_the_prefill_cache(cluster, backend, tpla_engine):
    """fork's branches and select's choices all start with the program's text so far: the prefill server
    computes it once (branches arriving together wait for the first) and the others read it from the cache."""
    prompt = ('def parse_config(path):\n    """Read a file of key = value lines into a dict, skipping blank lines '
              'and comments that start with a hash sign."""\n    result = {}\n')
    pages = len(tpla_engine.tokenizer.encode(prompt)) // 16  # whole 16-token pages (the CPU page size)
    assert pages >= 2
    before = _prefill_cached_tokens(cluster)
    branches.run(prompt=prompt, backend=backend)
    forked = _prefill_cached_tokens(cluster, before + pages * 16)
    assert forked - before >= pages * 16  # the second branch
    choose.run(prompt=prompt + "    for line in open(path):\n        ", backend=backend)
    # every choice and the prefix select caches first
    assert _prefill_cached_tokens(cluster, forked + 4 * pages * 16) - forked >= 4 * pages * 16
