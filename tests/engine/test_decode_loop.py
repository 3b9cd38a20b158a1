"""The decode loop's device-resident state and overlap scheduling.

The request table (one row of page ids and one token per running request, on the device) must always
equal what the host knows: the allocator's pages of every running request and its newest token, through
admissions, page growth, retraction, finishes and aborts. Overlap scheduling, which reads a step's tokens
one step late, must produce exactly the tokens of the loop that reads them at once.
"""

from __future__ import annotations

import random

import pytest
import torch

from tpla_serve import Engine
from tpla_serve.engine.request import Request
from tpla_serve.engine.scheduler import Scheduler

TINY = {"dtype": "float32", "device": "cpu", "page_size": 4}


def _check_table(sched: Scheduler) -> None:
    """Every running request's row holds its pages and its newest known token (writes applied)."""
    table = sched.runner.table
    table.apply(table.take_delta())
    slots = [r.slot for r in sched.running]
    assert None not in slots and len(set(slots)) == len(slots)
    assert table.num_free == table.max_slots - len(sched.running) - _reserved(sched)
    for req in sched.running:
        assert table.pages[req.slot, : len(req.pages)].tolist() == req.pages, req.rid
        if req.inflight == 0 and (req.output_ids or req.num_computed == req.total_len - 1):
            assert int(table.tokens[req.slot]) == req.last_token, req.rid
    owned = [set(r.pages) - r.tree_pages for r in sched.running]
    used = set().union(*owned)
    assert len(used) == sum(map(len, owned))  # no page owned by two requests
    tree = _tree_pages(sched)
    assert not used & tree and all(r.tree_pages <= tree for r in sched.running)
    assert sched.allocator.num_used == len(used | tree)


def _tree_pages(sched: Scheduler) -> set[int]:
    """Every page the prefix cache holds, walked from its root."""
    if sched.cache is None:
        return set()
    pages, todo = [], [sched.cache.root]
    while todo:
        node = todo.pop()
        pages.extend(node.pages)
        todo.extend(node.children.values())
    assert len(pages) == len(set(pages)) == sched.cache.num_pages
    return set(pages)


def _reserved(sched: Scheduler) -> int:
    return sum(1 for r in sched.requests.values() if r.slot is not None and r not in sched.running)


def _random_load(engine: Engine, seed: int) -> tuple[list[Request], set[str]]:
    rng = random.Random(seed)
    vocab = engine.runner.model_config.vocab_size
    prompts = [[rng.randrange(2, vocab) for _ in range(rng.randrange(1, 40))] for _ in range(24)]
    params = [{"max_new_tokens": rng.randrange(1, 30), "temperature": 0, "ignore_eos": True} for _ in prompts]
    reqs, _ = engine.add_requests(input_ids=prompts, sampling_params=params)
    return reqs, {reqs[i].rid for i in (3, 11, 17)}


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
def test_device_table_equals_the_allocators_pages_through_growth_retraction_and_aborts(tiny_v3_dir, overlap):
    engine = Engine(model_path=str(tiny_v3_dir), max_total_tokens=96, chunked_prefill_size=16,
                    disable_overlap_schedule=not overlap, **TINY)
    reqs, aborted = _random_load(engine, seed=1)
    sched = engine.scheduler
    steps = 0
    while sched.has_work:
        sched.step()
        steps += 1
        if steps == 6:
            for rid in aborted:
                engine.abort(rid)
        _check_table(sched)
    assert sched.num_retractions > 0, "the pool was meant to run short"
    assert sched.allocator.num_used == sched.cache.num_pages  # only the prefix cache holds pages
    assert sched.flush_cache()[0] and sched.allocator.num_free == sched.allocator.num_usable
    assert sched.runner.table.num_free == sched.runner.table.max_slots
    assert all(r.finished for r in reqs)


PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:", "for i in range(10):", "The quick brown", "x = [1, 2,"]


def _params(sampled: bool) -> list[dict]:
    """max_new_tokens that end requests at different steps of one batch."""
    out = []
    for i in range(len(PROMPTS)):
        p = {"max_new_tokens": 3 + 5 * i, "ignore_eos": True}
        p.update({"temperature": 0.8, "top_p": 0.9, "sampling_seed": 100 + i} if sampled else {"temperature": 0})
        out.append(p)
    return out


def _with_stops(engine: Engine, params: list[dict]) -> list[dict]:
    """Give every other request a stop string taken from the middle of its own text, so stops land
    mid-batch, at steps nothing else ends on."""
    texts = [o["text"] for o in engine.generate(PROMPTS, params)]
    out = []
    for i, (p, text) in enumerate(zip(params, texts)):
        mid = len(text) // 2
        stop = text[mid : mid + 2]
        out.append({**p, "stop": [stop]} if i % 2 and len(text) > 4 and stop.strip() else p)
    return out


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_overlap_produces_exactly_the_tokens_of_the_plain_loop(tiny_v3_dir, sampled):
    plain = Engine(model_path=str(tiny_v3_dir), disable_overlap_schedule=True, **TINY)
    params = _with_stops(plain, _params(sampled))
    outs = {}
    for overlap in (False, True):
        engine = Engine(model_path=str(tiny_v3_dir), disable_overlap_schedule=not overlap, **TINY)
        results = engine.generate(PROMPTS, params, return_logprob=True, top_logprobs_num=2)
        outs[overlap] = [(o["output_ids"], o["text"], o["meta_info"]["finish_reason"]) for o in results]
        logprobs = [o["meta_info"]["output_token_logprobs"] for o in results]
        outs[overlap, "logprobs"] = [[lp[0] for lp in x] for x in logprobs]
        assert all(len(x) == len(o["output_ids"]) for x, o in zip(logprobs, results))
        assert engine.scheduler.stats().pages_used == 0 and engine.scheduler.pending is None
    assert outs[True] == outs[False]
    torch.testing.assert_close(torch.tensor(sum(outs[True, "logprobs"], [])),
                               torch.tensor(sum(outs[False, "logprobs"], [])))
    reasons = [r[2]["type"] for r in outs[True]]
    assert "length" in reasons and "stop" in reasons, reasons  # both end requests mid-batch


def test_tp_decode_from_the_table_equals_one_process(tiny_v3_dir, engine_v3):
    """TP=2: rank 1 gets slots, positions and table writes only, never page lists, and decodes the same."""
    params = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    expected = [o["output_ids"] for o in engine_v3.generate(PROMPTS, params)]
    with Engine(model_path=str(tiny_v3_dir), tp_size=2, max_total_tokens=512, **TINY) as engine:
        got = [o["output_ids"] for o in engine.generate(PROMPTS, params)]
    assert got == expected
