"""Logprobs of given tokens (prompt logprobs, verification) and SGLang's response format for them.

SGLang reports each position as `[logprob, token_id, text or None]` (text only when
`return_text_in_logprobs`), and top logprobs as one list of such triples per position, or None
where a position has none (the first prompt token has no logprob at all: `[None, id, text]`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

_LOGPROB_MIN = torch.finfo(torch.float32).min


class _Decoder(Protocol):
    def batch_decode(self, sequences: list[list[int]], **kwargs: Any) -> list[str]: ...


def token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, top_k: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """log_softmax(logits[r])[token_ids[r]] for every row r, plus the row's top_k (values, ids).

    Prompt logprobs as SGLang computes them (raw logits, no temperature or penalties): the logprob of
    prompt token i comes from the logits at position i - 1, so for `logprob_start_len = s` pass the
    logits rows of positions max(s, 1) - 1 .. L - 2 with token_ids = input_ids[max(s, 1):L], and
    report position 0 (when s == 0) as None.
    """
    if logits.dim() != 2 or token_ids.shape != (logits.shape[0],):
        raise ValueError(
            f"logits [N, V] and token_ids [N] expected, got {tuple(logits.shape)}, {tuple(token_ids.shape)}"
        )
    full = torch.log_softmax(logits.float(), dim=-1).clamp(min=_LOGPROB_MIN)
    picked = full.gather(1, token_ids.long().unsqueeze(1)).squeeze(1)
    if top_k <= 0:
        return picked, None, None
    vals, ids = full.topk(min(top_k, full.shape[1]), dim=-1)
    return picked, vals, ids


def _texts(ids: Sequence[int], tokenizer: _Decoder | None) -> list[str | None]:
    if tokenizer is None:
        return [None] * len(ids)
    return list(tokenizer.batch_decode([[int(t)] for t in ids]))


def format_token_logprobs(
    values: Sequence[float | None], token_ids: Sequence[int], tokenizer: _Decoder | None = None
) -> list[list[Any]]:
    """`[[logprob, token_id, text or None], ...]`; text is the token decoded alone, when a
    tokenizer is given (SGLang's return_text_in_logprobs)."""
    if len(values) != len(token_ids):
        raise ValueError(f"{len(values)} logprobs for {len(token_ids)} token ids")
    texts = _texts(token_ids, tokenizer)
    return [[None if v is None else float(v), int(t), s] for v, t, s in zip(values, token_ids, texts)]


def format_top_logprobs(
    values: Sequence[Sequence[float] | None],
    token_ids: Sequence[Sequence[int] | None],
    tokenizer: _Decoder | None = None,
) -> list[list[list[Any]] | None]:
    """One list of triples per position; None for a position with no entries (as SGLang does)."""
    if len(values) != len(token_ids):
        raise ValueError(f"{len(values)} positions of values for {len(token_ids)} positions of ids")
    return [format_token_logprobs(v, t, tokenizer) if v else None for v, t in zip(values, token_ids)]
