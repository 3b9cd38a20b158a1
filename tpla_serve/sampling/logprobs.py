"""Logprobs of given tokens (prompt logprobs, verification) and SGLang's response format for them.

SGLang reports each position as `[logprob, token_id, text or None]` (text only when
`return_text_in_logprobs`), and top logprobs as one list of such triples per position, or None
where a position has none (the first prompt token has no logprob at all: `[None, id, text]`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

_LOGPROB_MIN = torch.finfo(torch.float32).min


class _Decoder(Protocol):
    def batch_decode(self, sequences: list[list[int]], **kwargs: Any) -> list[str]: ...


@dataclass
class TokenLogprobs:
    """Logprobs of a run of tokens, one position each: the token, its logprob (None where a position has
    none, as the first prompt token) and, when top-k was asked for, the top values and ids (None where a
    position has no entries)."""

    token_ids: list[int] = field(default_factory=list)
    values: list[float | None] = field(default_factory=list)
    top_values: list[list[float] | None] = field(default_factory=list)
    top_ids: list[list[int] | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.token_ids)

    def append(
        self, token_id: int, value: float | None, top_values: list[float] | None = None,
        top_ids: list[int] | None = None,
    ) -> None:
        self.token_ids.append(token_id)
        self.values.append(value)
        self.top_values.append(top_values)
        self.top_ids.append(top_ids)

    def append_from(self, other: TokenLogprobs, i: int) -> None:
        """Append position i of `other`."""
        self.append(other.token_ids[i], other.values[i], other.top_values[i], other.top_ids[i])

    def extend(self, other: TokenLogprobs) -> None:
        self.token_ids.extend(other.token_ids)
        self.values.extend(other.values)
        self.top_values.extend(other.top_values)
        self.top_ids.extend(other.top_ids)

    def slice(self, start: int, end: int) -> TokenLogprobs:
        return TokenLogprobs(
            self.token_ids[start:end], self.values[start:end], self.top_values[start:end], self.top_ids[start:end]
        )

    @classmethod
    def from_tensors(
        cls,
        token_ids: list[int],
        values: torch.Tensor,
        top_values: torch.Tensor | None = None,
        top_ids: torch.Tensor | None = None,
        top_nums: Sequence[int] | None = None,
    ) -> TokenLogprobs:
        """One host transfer per tensor; each row's top-k cut to its own k (all of it when top_nums is None)."""
        ids, vals = token_ids, values.tolist()
        if top_values is None or top_ids is None:
            return cls(ids, vals, [None] * len(ids), [None] * len(ids))
        tv, ti = top_values.tolist(), top_ids.tolist()
        ks = top_nums if top_nums is not None else [len(r) for r in tv]
        return cls(ids, vals, [v[:k] for v, k in zip(tv, ks)], [t[:k] for t, k in zip(ti, ks)])

    def formatted(self, tokenizer: _Decoder | None = None) -> list[list[Any]]:
        """SGLang's `*_token_logprobs`."""
        return format_token_logprobs(self.values, self.token_ids, tokenizer)

    def formatted_top(self, tokenizer: _Decoder | None = None) -> list[list[list[Any]] | None]:
        """SGLang's `*_top_logprobs`."""
        return format_top_logprobs(self.top_values, self.top_ids, tokenizer)


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
