"""Logprobs of given tokens and SGLang's [logprob, token_id, text] formatting."""

from __future__ import annotations

import pytest
import torch

from tpla_serve.sampling import format_token_logprobs, format_top_logprobs, token_logprobs


def test_token_logprobs_match_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 50, generator=g) * 3
    ids = torch.randint(0, 50, (7,), generator=g)
    lp, vals, top_ids = token_logprobs(logits, ids, top_k=4)
    ref = torch.log_softmax(logits.double(), dim=-1)
    torch.testing.assert_close(lp.double(), ref[torch.arange(7), ids], rtol=1e-5, atol=1e-5)
    ref_vals, ref_ids = ref.topk(4, dim=-1)
    assert torch.equal(top_ids, ref_ids)
    torch.testing.assert_close(vals.double(), ref_vals, rtol=1e-5, atol=1e-5)
    only, none_vals, none_ids = token_logprobs(logits.half(), ids)
    assert only.dtype == torch.float32 and none_vals is None and none_ids is None
    with pytest.raises(ValueError, match="token_ids"):
        token_logprobs(logits, ids[:3])


def test_prompt_logprob_alignment():
    """Token i's logprob comes from the logits at position i - 1 (a causal LM's shift)."""
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 30, (6,), generator=g)
    logits = torch.randn(6, 30, generator=g)  # row j: next-token logits after prompt[: j + 1]
    start = 2
    lp, _, _ = token_logprobs(logits[start - 1 : -1], prompt[start:])
    for i in range(start, 6):
        assert lp[i - start] == pytest.approx(
            float(torch.log_softmax(logits[i - 1], -1)[prompt[i]]), abs=1e-6
        )


def test_format_matches_sglang_shape(bpe_tokenizer):
    ids = bpe_tokenizer.encode("Hello 🙂")
    values = [None] + [-0.5 * (i + 1) for i in range(len(ids) - 1)]
    plain = format_token_logprobs(values, ids)
    assert plain == [[v, t, None] for v, t in zip(values, ids)]
    with_text = format_token_logprobs(values, ids, bpe_tokenizer)
    assert [row[2] for row in with_text] == [bpe_tokenizer.decode([t]) for t in ids]
    assert with_text[0][0] is None and all(isinstance(row[1], int) for row in with_text)
    top = format_top_logprobs([None, [-0.1, -2.0], []], [None, ids[:2], []], bpe_tokenizer)
    assert top[0] is None and top[2] is None
    assert top[1] == [
        [-0.1, ids[0], bpe_tokenizer.decode([ids[0]])],
        [-2.0, ids[1], bpe_tokenizer.decode([ids[1]])],
    ]
    with pytest.raises(ValueError):
        format_token_logprobs([0.0], [1, 2])
