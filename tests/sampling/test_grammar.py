"""Grammars compiled by xgrammar over the bundled model's vocabulary, their matchers and token bitmasks.

The bitmask is xgrammar's layout (bit b of int32 word w allows token 32·w + b) unpacked in torch; the
sampler applies it with the penalties, so greedy picks the best allowed token and logprobs and the
speculative verifier's distributions see only allowed tokens.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from tpla_serve.engine.tokenizer import load_tokenizer
from tpla_serve.grammar.backend import GrammarBackend, GrammarError, request_grammar
from tpla_serve.grammar.matcher import grammar_bitmask, host_bitmask
from tpla_serve.sampling.bitmask import TokenBitmask, bitmask_width
from tpla_serve.sampling.params import SamplingParams
from tpla_serve.sampling.sampler import Sampler, SamplingBatch
from tpla_serve.speculative.verify import processed_probs

MODEL = Path(__file__).resolve().parents[2] / "models" / "mla-tiny"
EOS = 1
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(MODEL))


@pytest.fixture(scope="module")
def backend(tokenizer) -> GrammarBackend:
    return GrammarBackend(tokenizer, len(tokenizer), {EOS}, cache_size=3)


def _allowed(mask: TokenBitmask, vocab: int) -> list[set[int]]:
    return [set(torch.nonzero(row).flatten().tolist()) for row in mask.allowed(vocab)]


def test_bitmask_unpacks_as_xgrammar_packs_it():
    vocab = 70  # not a multiple of 32: the last word's high bits are past the vocabulary
    gen = torch.Generator().manual_seed(0)
    allowed = torch.rand(3, vocab, generator=gen) < 0.3
    bits = torch.zeros(3, bitmask_width(vocab), dtype=torch.int64)
    for r, t in torch.nonzero(allowed).tolist():
        bits[r, t // 32] |= 1 << (t % 32)
    mask = TokenBitmask.to_device([0, 2, 4], bits.to(torch.int32), CPU)  # wrap to int32 as xgrammar stores it
    assert torch.equal(mask.allowed(vocab), allowed)
    logits = torch.randn(5, vocab)
    masked = logits.clone()
    mask.apply(masked)
    for i, row in enumerate([0, 2, 4]):
        assert torch.equal(masked[row][allowed[i]], logits[row][allowed[i]])
        assert torch.isneginf(masked[row][~allowed[i]]).all()
    assert torch.equal(masked[[1, 3]], logits[[1, 3]])  # rows without a grammar are untouched


def test_regex_matcher_masks_accepts_rolls_back_and_terminates(backend, tokenizer):
    grammar = backend.matcher(SamplingParams(regex=r"[0-9]+"))
    assert grammar is not None and grammar.field == "regex"
    vocab = len(tokenizer)
    digits = {t for t in range(vocab) if re.fullmatch(r"[0-9]+", tokenizer.decode([t]))}
    (first,) = _allowed(grammar_bitmask([grammar], vocab, CPU), vocab)
    assert first == digits  # no EOS before a digit
    token = min(digits)
    assert grammar.accept(token)
    (after,) = _allowed(grammar_bitmask([grammar], vocab, CPU), vocab)
    assert after == digits | {EOS}
    assert not grammar.accept(tokenizer.encode("x", add_special_tokens=False)[0])  # refused, state unchanged
    grammar.rollback(1)
    (again,) = _allowed(grammar_bitmask([grammar], vocab, CPU), vocab)
    assert again == first
    assert grammar.accept(token) and grammar.accept(EOS) and grammar.terminated
    assert grammar_bitmask([grammar, None], vocab, CPU) is None  # a finished grammar constrains nothing
    with pytest.raises(RuntimeError, match="terminated"):
        grammar.fill(host_bitmask(1, vocab, CPU), 0)


def test_batch_bitmask_covers_only_the_constrained_rows(backend, tokenizer):
    vocab = len(tokenizer)
    grammars = [None, backend.matcher(SamplingParams(regex="(yes|no)")), None]
    mask = grammar_bitmask(grammars, vocab, CPU)
    assert mask is not None and mask.rows.tolist() == [1]
    (allowed,) = _allowed(mask, vocab)
    assert {tokenizer.decode([t]) for t in allowed} <= {"y", "ye", "yes", "n", "no"}


def test_errors_name_the_field_and_the_problem(backend):
    cases = [
        ({"regex": "(abc"}, r"^regex: Regex parsing error at position \d+: The parenthesis is not closed"),
        ({"json_schema": "{bad"}, r"^json_schema: not valid JSON"),
        ({"json_schema": '{"type": "strin"}'}, r'^json_schema: Unsupported type "strin"'),
        (
            {"ebnf": "root ::= missing"},
            r'^ebnf: EBNF parser error at line 1, column \d+: Rule "missing" is not defined',
        ),
    ]
    for params, message in cases:
        with pytest.raises(GrammarError, match=message):
            backend.matcher(SamplingParams(**params))
    with pytest.raises(GrammarError, match="^regex: constrained decoding is off on this server"):
        request_grammar(None, SamplingParams(regex="a"))
    assert request_grammar(None, SamplingParams()) is None


def test_compiled_grammars_are_cached_least_recently_used_first_out(tokenizer):
    backend = GrammarBackend(tokenizer, len(tokenizer), {EOS}, cache_size=2)
    keys = [("regex", "a+"), ("regex", "b+"), ("json_schema", json.dumps({"type": "integer"}))]
    first = backend.compile(keys[0])
    backend.compile(keys[1])
    assert backend.compile(keys[0]) is first and (backend.hits, backend.misses) == (1, 2)
    backend.compile(keys[2])  # evicts keys[1], the least recently used
    assert len(backend) == 2
    assert backend.compile(keys[0]) is first and backend.hits == 2
    backend.compile(keys[1])
    assert backend.misses == 4
    # Matchers over one compiled grammar move independently.
    a, b = (backend.matcher(SamplingParams(regex="a+")) for _ in range(2))
    assert a is not None and b is not None
    token = tokenizer.encode("a", add_special_tokens=False)[0]
    assert a.accept(token) and a.accept(EOS) and a.terminated and not b.terminated


def test_any_json_and_ebnf(backend, tokenizer):
    vocab = len(tokenizer)
    for params in (SamplingParams(json_schema="$$ANY$$"), SamplingParams(ebnf='root ::= "def " [a-z]+')):
        grammar = backend.matcher(params)
        (allowed,) = _allowed(grammar_bitmask([grammar], vocab, CPU), vocab)
        assert EOS not in allowed and allowed


def test_sampler_and_verifier_see_only_allowed_tokens(backend, tokenizer):
    vocab = len(tokenizer)
    grammar = backend.matcher(SamplingParams(regex="(yes|no)"))
    mask = grammar_bitmask([grammar, None], vocab, CPU)
    assert mask is not None
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=50)]
    batch = SamplingBatch.build(params, [[], []], [1, 2], vocab, CPU, eos_token_ids=[EOS])
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(3))
    out = Sampler()(logits, batch_with(batch, mask), return_logprob=True, top_logprobs_nums=[5, 5])
    (allowed,) = _allowed(mask, vocab)
    best = max(allowed, key=lambda t: logits[0, t].item())
    assert out.next_token_ids[0].item() == best
    assert out.next_token_ids[1].item() == Sampler()(logits, batch).next_token_ids[1].item()  # unconstrained
    finite = [
        t for t, v in zip(out.top_logprobs_ids[0].tolist(), out.top_logprobs_vals[0].tolist()) if v > -1e30
    ]
    assert set(finite) <= allowed
    q = processed_probs(
        logits,
        batch_with(
            SamplingBatch.build(
                [SamplingParams(temperature=0.8), SamplingParams()], [[], []], [1, 2], vocab, CPU
            ),
            mask,
        ),
    )
    assert q[0].sum().item() == pytest.approx(1.0) and set(torch.nonzero(q[0]).flatten().tolist()) <= allowed


def batch_with(batch: SamplingBatch, mask: TokenBitmask) -> SamplingBatch:
    return dataclasses.replace(batch, grammar_mask=mask)
