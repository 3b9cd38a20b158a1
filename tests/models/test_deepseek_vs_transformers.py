"""Our DeepSeek model against transformers' DeepseekV2ForCausalLM / DeepseekV3ForCausalLM (eager, fp32):
full prefill, chunked prefill over a cached prefix, and step-by-step absorbed decode through scattered
pages. Tolerance: REL_TOL (1e-4) of the logits' largest magnitude."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from model_test_utils import (
    HF_CASES,
    VOCAB,
    PagedRunner,
    assert_bf16_no_worse_than_transformers,
    assert_close_rel,
    hf_logits,
    prefill_then_decode,
)

from tpla_serve.forward_batch import BatchEntry, ForwardMode, build_forward_batch
from tpla_serve.models import load_model

SEQ_LEN = 256


def _tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(n)]


@pytest.fixture(scope="module", params=sorted(HF_CASES))
def case(request, hf_checkpoints):
    directory, hf_model = hf_checkpoints[request.param]
    ours = load_model(directory, dtype=torch.float32, show_progress=False)
    return request.param, hf_model, ours


def test_full_prefill(case) -> None:
    name, hf_model, ours = case
    tokens = _tokens(1, SEQ_LEN)
    runner = PagedRunner(ours, page_size=16, max_tokens=SEQ_LEN)
    (logits,) = runner.step(ForwardMode.EXTEND, [(runner.add(tokens), SEQ_LEN)])
    assert_close_rel(logits, hf_logits(hf_model, tokens), f"{name} prefill")


def test_chunked_prefill_batched_with_a_fresh_request(case) -> None:
    """Request A is prefilled in three chunks over its cached prefix; request B (fresh) shares A's second
    chunk's batch, so the batch mixes prefix lengths."""
    name, hf_model, ours = case
    a, b = _tokens(2, SEQ_LEN), _tokens(3, 97)
    runner = PagedRunner(ours, page_size=4, max_tokens=SEQ_LEN + 100)
    ra, rb = runner.add(a), runner.add(b)
    (a1,) = runner.step(ForwardMode.EXTEND, [(ra, 100)])
    a2, b_all = runner.step(ForwardMode.EXTEND, [(ra, 70), (rb, len(b))])
    (a3,) = runner.step(ForwardMode.EXTEND, [(ra, SEQ_LEN - 170)])
    assert_close_rel(torch.cat([a1, a2, a3]), hf_logits(hf_model, a), f"{name} chunked prefill")
    assert_close_rel(b_all, hf_logits(hf_model, b), f"{name} batched fresh prefill")


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_stepwise_decode(case, page_size: int) -> None:
    """Two requests of different lengths decode one token per step in one batch through the absorbed form;
    at the end, request A verifies 3 tokens in one decode step (speculative-verification shape)."""
    name, hf_model, ours = case
    a, b = _tokens(4, 160), _tokens(5, 100)
    ref_a, ref_b = hf_logits(hf_model, a), hf_logits(hf_model, b)
    runner = PagedRunner(ours, page_size=page_size, max_tokens=len(a) + len(b), seed=page_size)
    ra, rb = runner.add(a), runner.add(b)
    runner.step(ForwardMode.EXTEND, [(ra, 8), (rb, 5)])
    out_a: list[torch.Tensor] = []
    out_b: list[torch.Tensor] = []
    while ra.cached < len(a) - 3:
        work = [(ra, 1)] + ([(rb, 1)] if rb.cached < len(b) else [])
        logits = runner.step(ForwardMode.DECODE, work)
        out_a.append(logits[0])
        if len(logits) > 1:
            out_b.append(logits[1])
    (last3,) = runner.step(ForwardMode.DECODE, [(ra, 3)])
    assert_close_rel(torch.cat(out_a + [last3]), ref_a[8:], f"{name} decode A (page {page_size})")
    assert_close_rel(torch.cat(out_b), ref_b[5:], f"{name} decode B (page {page_size})")


def test_final_hidden_states(case) -> None:
    """forward_with_hidden() also returns the final-norm hidden states of every new token."""
    name, hf_model, ours = case
    tokens = _tokens(6, 64)
    runner = PagedRunner(ours, page_size=16, max_tokens=64)
    request = runner.add(tokens)
    fb = build_forward_batch(
        ForwardMode.EXTEND, [BatchEntry(tokens, 0, request.pages)], runner.pool, runner.backend, "cpu"
    )
    with torch.no_grad():
        logits, hidden = ours.forward_with_hidden(fb)
        ref = hf_model.model(torch.tensor([tokens])).last_hidden_state[0]
    assert hidden.shape == (len(tokens), ours.config.hidden_size) and logits.shape == (1, VOCAB)
    assert_close_rel(hidden, ref, f"{name} final hidden states")
    assert_close_rel(logits[0], hf_logits(hf_model, tokens)[-1], f"{name} last-token logits")


def test_bf16_as_close_to_fp32_as_transformers_bf16(case, hf_checkpoints) -> None:
    name, hf_model, _ = case
    tokens = _tokens(7, 160)
    ours = load_model(hf_checkpoints[name][0], dtype=torch.bfloat16, show_progress=False)
    hf_bf16 = copy.deepcopy(hf_model).to(torch.bfloat16)
    assert_bf16_no_worse_than_transformers(
        prefill_then_decode(ours, tokens, 64), hf_logits(hf_bf16, tokens), hf_logits(hf_model, tokens)
    )
