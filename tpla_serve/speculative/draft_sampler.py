"""Rank 0's draws of a block's drafts: the draft loop's TokenSource.

Draft j of request b is drawn by the sampler from the processed draft distribution q after d_1..d_j, with
the request's (seed, step) noise. Without penalties or a pending min_new_tokens, the rows' sampling batch
is built once per block and each draft only moves its step counters; the tokens then stay on the device
until the block ends. Penalties count the drafts themselves, and grammars advance through each draft on
the host, so a block with either reads each draft back as it is drawn.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

import torch
import torch.distributed as dist

from tpla_serve.engine.request import Request
from tpla_serve.sampling.sampler import Sampler, SamplingBatch
from tpla_serve.speculative.grammar_block import BlockGrammars
from tpla_serve.speculative.verify import processed_probs


class DraftSampler:
    """Draws the drafts of block rows `rows` (indices into the step's requests, each drafting
    num_drafts[i] >= 1 tokens). `limit[i]`: how many of row i's drafts it proposes, fewer than num_drafts[i]
    where its grammar refused one or completed; `probs`: each draft's q [B, V] unless every row is greedy."""

    def __init__(
        self,
        reqs: list[Request],
        rows: list[int],
        num_drafts: list[int],
        grammars: BlockGrammars,
        sampler: Sampler,
        vocab_size: int,
        eos_token_ids: Collection[int],
        device: torch.device,
        broadcast: bool,
    ) -> None:
        self.reqs = [reqs[b] for b in rows]
        self.rows = rows
        self.grammars = grammars
        self.sampler = sampler
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.device = device
        self.broadcast = broadcast
        self.limit = list(num_drafts)
        self.need_probs = not all(r.params.is_greedy for r in self.reqs)
        self.probs: list[torch.Tensor] = []
        self._drafts: list[list[int]] = [[] for _ in rows]  # on the host, for penalties or grammars
        self._base = self._build()
        self._reusable = self._base.penalties is None and self._base.stop_mask is None
        self._on_host = grammars.any or not self._reusable

    @property
    def argmax_only(self) -> bool:
        """Every draft is the argmax of the raw draft logits: greedy rows, no penalties, min_new_tokens mask
        or grammar."""
        return not self.need_probs and self._reusable and not self.grammars.any

    def _build(self) -> SamplingBatch:
        return SamplingBatch.build(
            [r.params for r in self.reqs],
            [r.output_ids + d for r, d in zip(self.reqs, self._drafts)],
            [r.seed for r in self.reqs],
            self.vocab_size,
            self.device,
            eos_token_ids=self.eos_token_ids,
        )

    def __call__(self, index: int, logits: torch.Tensor | None) -> torch.Tensor:
        assert logits is not None, "rank 0 draws the drafts"
        if self._reusable:
            batch = dataclasses.replace(self._base, steps=self._base.steps + index)
        else:
            batch = self._base if index == 0 else self._build()
        if self.grammars.any:
            mask = self.grammars.bitmask([(b, index) for b in self.rows])
            batch = dataclasses.replace(batch, grammar_mask=mask)
        tokens = self.sampler(logits, batch).next_token_ids
        if self.need_probs:
            self.probs.append(processed_probs(logits, batch))
        if self._on_host:
            self._advance(index, tokens.tolist())
        if self.broadcast:
            dist.broadcast(tokens, src=0)
        return tokens

    def _advance(self, index: int, tokens: list[int]) -> None:
        """Grammars through draft `index` of the rows still proposing; a refused draft ends its row's block
        before it, one that completes the grammar is its row's last."""
        for i, (b, tok) in enumerate(zip(self.rows, tokens)):
            self._drafts[i].append(tok)
            if index >= self.limit[i]:
                continue
            if not self.grammars.accept(b, tok):
                self.limit[i] = index
            elif not self.grammars.may_draft(b):
                self.limit[i] = index + 1

    def draft_probs(self, num_drafts: list[int]) -> torch.Tensor | None:
        """q [B, k, V] of the rows' proposed drafts (zero past each row's count), or None if all greedy."""
        if not self.need_probs:
            return None
        q = torch.stack(self.probs, dim=1)
        counts = torch.tensor(num_drafts, device=q.device)
        keep = torch.arange(q.shape[1], device=q.device)[None, :] < counts[:, None]
        return q * keep[:, :, None]
