"""Speculative decoding through the engine (T = 2 over gloo): greedy outputs equal plain decoding of the
target token for token, with k, stops and max_new_tokens landing inside draft blocks, and under grammars
(drafts drawn and verified under the same bitmasks); logprobs, metrics, KV pages back to baseline after
aborts and retraction.

The target and draft are the project's trained models (models/mla-tiny, models/mla-tiny-draft), so drafts
are accepted often and blocks really end early, mid-block and at the bonus token.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from tpla_serve import Engine
from tpla_serve.forward_batch import ForwardMode

ROOT = Path(__file__).resolve().parents[2]
TARGET = str(ROOT / "models" / "mla-tiny")
DRAFT = str(ROOT / "models" / "mla-tiny-draft")

PROMPTS = [
    "def fibonacci(n):",
    "The quick brown fox",
    "import numpy as np\n",
    "Once upon a time, there was",
    "class Engine:\n    def __init__(self",
    "for i in range(10):",
    "The capital of France is",
    "# A function that sorts a list\n",
]
# The decode server's target: TPLA with two latent groups on two ranks.
TARGET_ARGS = {"model_path": TARGET, "tp_size": 2, "tpla_groups": 2, "dtype": "float32", "device": "cpu"}


BATCHED = [{"temperature": 0, "max_new_tokens": n, "ignore_eos": True} for n in (1, 2, 5, 7, 13, 24, 31, 40)]
ALONE = {"temperature": 0, "max_new_tokens": 33, "ignore_eos": True}
PENALIZED = {"temperature": 0, "max_new_tokens": 20, "repetition_penalty": 1.3, "frequency_penalty": 0.5}
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
CONSTRAINED = [  # (prompt, sampling params): grammars that end within the budget, and one free request
    ("def fibonacci(n):", {"regex": r"[0-9]{3}-[a-z]{2,5}"}),
    ("def fibonacci(n):", {"json_schema": json.dumps(SCHEMA)}),
    ("# numbers\n", {"regex": r"-?(0|[1-9][0-9]{0,5})(\.[0-9]{1,3})?"}),
    ("def ", {"ebnf": 'root ::= [a-z_]+ "(" [a-z_]* "):"'}),
    ("for i in range(10):", {"ignore_eos": True}),
]
CONSTRAINED_PARAMS = [{**p, "temperature": 0, "max_new_tokens": 48} for _, p in CONSTRAINED]


def _stop_params(base: list[dict]) -> list[dict]:
    """Stops the plain output reaches a few tokens in: a stop string from the middle of its text, or a
    stop token id it emits."""
    params = []
    for i, out in enumerate(base):
        if i % 2 == 0:
            start = 6 + i
            params.append({"temperature": 0, "max_new_tokens": 40, "stop": [out["text"][start : start + 3]]})
        else:
            params.append({"temperature": 0, "max_new_tokens": 40, "stop_token_ids": [out["output_ids"][5 + i]]})
    return params


@pytest.fixture(scope="module")
def plain() -> dict:
    """Plain decoding's outputs for every case (one process holds one TP group: the engine is closed
    before the speculative ones start)."""
    with Engine(**TARGET_ARGS) as engine:
        base = engine.generate(PROMPTS, {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True})
        stops = _stop_params(base)
        return {
            "batched": engine.generate(PROMPTS, BATCHED),
            "alone": [engine.generate(p, ALONE) for p in PROMPTS[:3]],
            "stop_params": stops,
            "stops": engine.generate(PROMPTS, stops),
            "penalized": engine.generate(PROMPTS[:4], PENALIZED, return_logprob=True, top_logprobs_num=3),
            "constrained": engine.generate([p for p, _ in CONSTRAINED], CONSTRAINED_PARAMS),
        }


@pytest.fixture(scope="module", params=[("easyspec", 4), ("standard", 3)], ids=["easyspec-k4", "standard-k3"])
def spec(request, plain):
    algorithm, k = request.param
    with Engine(
        **TARGET_ARGS,
        speculative_algorithm=algorithm,
        speculative_draft_model_path=DRAFT,
        speculative_num_draft_tokens=k,
    ) as engine:
        yield engine


def _ids(outs: list[dict]) -> list[list[int]]:
    return [o["output_ids"] for o in outs]


def test_greedy_batched_equals_plain_decoding(plain, spec):
    want = plain["batched"]
    got = spec.generate(PROMPTS, BATCHED)
    assert _ids(got) == _ids(want)
    assert [o["text"] for o in got] == [o["text"] for o in want]
    assert [o["meta_info"]["finish_reason"] for o in got] == [o["meta_info"]["finish_reason"] for o in want]
    long = got[-1]["meta_info"]
    assert long["spec_verify_ct"] < 39, "drafts were never accepted: the test would not exercise blocks"
    assert long["spec_num_correct_drafts"] > 0


def test_greedy_alone_equals_plain_decoding(plain, spec):
    for prompt, want in zip(PROMPTS[:3], plain["alone"]):
        assert spec.generate(prompt, ALONE)["output_ids"] == want["output_ids"]


def test_stops_inside_draft_blocks(plain, spec):
    want = plain["stops"]
    got = spec.generate(PROMPTS, plain["stop_params"])
    assert _ids(got) == _ids(want)
    assert [o["text"] for o in got] == [o["text"] for o in want]
    reasons = [o["meta_info"]["finish_reason"] for o in got]
    assert reasons == [o["meta_info"]["finish_reason"] for o in want]
    assert all(r["type"] == "stop" for r in reasons)


def test_penalties_and_logprobs_equal_plain(plain, spec):
    want = plain["penalized"]
    got = spec.generate(PROMPTS[:4], PENALIZED, return_logprob=True, top_logprobs_num=3)
    assert _ids(got) == _ids(want)
    for g, w in zip(got, want):
        g_lp, w_lp = g["meta_info"]["output_token_logprobs"], w["meta_info"]["output_token_logprobs"]
        assert [t for _, t, _ in g_lp] == [t for _, t, _ in w_lp]
        assert [v for v, _, _ in g_lp] == pytest.approx([v for v, _, _ in w_lp], abs=1e-4)
        g_top, w_top = g["meta_info"]["output_top_logprobs"], w["meta_info"]["output_top_logprobs"]
        assert [[t for _, t, _ in pos] for pos in g_top] == [[t for _, t, _ in pos] for pos in w_top]


def test_constrained_equals_plain_constrained_decoding(plain, spec):
    want = plain["constrained"]
    got = spec.generate([p for p, _ in CONSTRAINED], CONSTRAINED_PARAMS)
    assert _ids(got) == _ids(want)
    assert [o["meta_info"]["finish_reason"] for o in got] == [o["meta_info"]["finish_reason"] for o in want]
    for (_, params), out in zip(CONSTRAINED, got):
        if "regex" in params:
            assert re.fullmatch(params["regex"], out["text"]), out["text"]
        elif "json_schema" in params:
            jsonschema.validate(json.loads(out["text"]), SCHEMA)
    accepted = sum(o["meta_info"]["spec_num_correct_drafts"] for o in got[:-1])
    assert accepted > 0, "no constrained draft was accepted: the test would not exercise blocks"
    # Sampled: drafts and verification under the grammar keep every output inside it.
    sampled = [{**p, "temperature": 0.9, "sampling_seed": 5} for p in CONSTRAINED_PARAMS[:3]]
    for (_, params), out in zip(CONSTRAINED, spec.generate([p for p, _ in CONSTRAINED[:3]], sampled)):
        if out["meta_info"]["finish_reason"]["type"] == "stop" and "regex" in params:
            assert re.fullmatch(params["regex"], out["text"]), out["text"]


def test_meta_info_and_stats_count_blocks(spec):
    out = spec.generate(PROMPTS[0], {"temperature": 0, "max_new_tokens": 30, "ignore_eos": True})
    meta = out["meta_info"]
    k = spec.config.speculative_num_draft_tokens
    verify = meta["spec_verify_ct"]
    assert 0 < verify <= 29
    assert 0 <= meta["spec_num_correct_drafts"] <= meta["spec_num_proposed_drafts"] <= k * verify
    assert meta["spec_accept_length"] == pytest.approx(29 / verify)
    assert meta["spec_accept_rate"] == pytest.approx(meta["spec_num_correct_drafts"] / meta["spec_num_proposed_drafts"])
    stats = spec.get_server_info()
    assert stats["spec_verify_steps"] >= verify
    assert stats["spec_draft_seconds"] > 0 and stats["spec_verify_seconds"] > 0
    assert 1.0 <= stats["spec_accept_length"] <= k + 1


def test_one_control_message_per_block(spec, monkeypatch):
    """Rank 0 announces a block's drafting once (EasySpec: every rank drafts it; standard: rank 0 alone,
    nothing sent), never a draft step at a time."""
    tp = spec.parts.tp
    sent: list[tuple[str, object]] = []
    announce = tp.announce

    def recording(op: object) -> None:
        sent.append((type(op).__name__, getattr(op, "mode", None)))
        announce(op)

    monkeypatch.setattr(tp, "announce", recording)
    before = spec.get_server_info()["spec_verify_steps"]
    spec.generate(PROMPTS[:3], {"temperature": 0, "max_new_tokens": 20, "ignore_eos": True})
    blocks = spec.get_server_info()["spec_verify_steps"] - before
    draft_blocks = sum(name == "RunDraftBlock" for name, _ in sent)
    assert ("RunDraftStep", ForwardMode.DECODE) not in sent
    if spec.config.speculative_algorithm == "easyspec":
        assert 0 < draft_blocks <= blocks
    else:
        assert draft_blocks == 0


def test_pages_return_to_baseline_after_aborts(spec):
    sched = spec.scheduler
    base = sched.stats().pages_used
    params = {"temperature": 0.8, "top_p": 0.9, "max_new_tokens": 48, "ignore_eos": True}
    reqs, _ = spec.add_requests(PROMPTS * 3, [dict(params, sampling_seed=i) for i in range(24)])
    for step in range(12):
        sched.step()
        if step in (3, 7):  # aborts land between blocks, mid-request
            for req in reqs[step::5]:
                spec.abort(req.rid)
    while sched.has_work:
        sched.step()
    for req in reqs:
        sched.pop_finished(req.rid)
    assert sched.stats().pages_used == base
    assert any(r.finish_reason["type"] == "abort" for r in reqs)
    assert any(r.finish_reason["type"] == "length" for r in reqs)


def test_retraction_keeps_outputs_and_pages():
    """A KV pool far too small for the batch: requests are retracted and recomputed (target and draft KV
    alike), the outputs stay those of plain decoding and every page comes back."""
    args = {"model_path": TARGET, "dtype": "float32", "device": "cpu", "max_total_tokens": 256}
    params = {"temperature": 0, "max_new_tokens": 48, "ignore_eos": True}
    with Engine(**args) as engine:
        want = engine.generate(PROMPTS, params)
    with Engine(**args, speculative_algorithm="standard", speculative_draft_model_path=DRAFT) as engine:
        got = engine.generate(PROMPTS, params)
        assert engine.scheduler.num_retractions > 0
        assert engine.scheduler.stats().pages_used == 0
    assert _ids(got) == _ids(want)
