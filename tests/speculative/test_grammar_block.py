"""A speculative block's grammar bitmasks: one per draft position, laid out as the verification rows, and
every matcher back at the block's start afterwards (the scheduler advances it through the emitted tokens)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tpla_serve.engine.tokenizer import load_tokenizer
from tpla_serve.grammar.backend import GrammarBackend
from tpla_serve.grammar.matcher import grammar_bitmask
from tpla_serve.sampling.params import SamplingParams
from tpla_serve.speculative.grammar_block import BlockGrammars

MODEL = Path(__file__).resolve().parents[2] / "models" / "mla-tiny"
CPU = torch.device("cpu")
EOS = 1


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(MODEL))


@pytest.fixture(scope="module")
def backend(tokenizer) -> GrammarBackend:
    return GrammarBackend(tokenizer, len(tokenizer), {EOS})


def _allowed(mask, vocab: int, row: int) -> set[int]:
    rows = mask.rows.tolist()
    return set(torch.nonzero(mask.allowed(vocab)[rows.index(row)]).flatten().tolist())


def test_masks_per_draft_position_and_rollback(backend, tokenizer):
    vocab = len(tokenizer)
    tok = {s: tokenizer.encode(s, add_special_tokens=False)[0] for s in ("1", "2", "x")}
    grammar = backend.matcher(SamplingParams(regex="[0-9]{2}"))
    reqs = [SimpleNamespace(grammar=None), SimpleNamespace(grammar=grammar)]
    start = grammar_bitmask([grammar], vocab, CPU)
    block = BlockGrammars(reqs, [3, 3], vocab, CPU)  # type: ignore[arg-type]
    assert block.accept(0, tok["x"])  # an unconstrained request takes anything
    assert block.accept(1, tok["1"]) and block.accept(1, tok["2"])
    assert not block.accept(1, tok["x"])  # refused: the drafting ends there
    assert block.accept(1, EOS) and not block.may_draft(1)  # the grammar is complete
    mask = block.bitmask([(0, 0), (1, 0), (1, 1), (1, 2), (1, 3)])
    assert mask is not None and mask.rows.tolist() == [
        1,
        2,
        3,
    ]  # nothing after the stop token, or unconstrained
    digits = _allowed(start, vocab, 0)
    assert _allowed(mask, vocab, 1) == digits and EOS not in digits
    assert _allowed(mask, vocab, 2) <= digits
    assert _allowed(mask, vocab, 3) == {EOS}
    block.rollback()
    assert not grammar.terminated
    again = grammar_bitmask([grammar], vocab, CPU)
    assert torch.equal(again.bits, start.bits)
