"""One speculative decoding step for a batch of running requests: calibrate, draft, verify.

For request b with last token x at position p (target KV cached for positions < p, draft KV exact for
positions < draft_computed) and a block of k_b draft tokens:

1. Bonus calibration: the draft's exact sequential EXTEND over all_ids[draft_computed:] (the previous
   block's accepted tokens and its bonus/correction token, or the prompt and first token after prefill)
   rewrites their draft KV; its last logits give d_1.
2. Drafting: k_b - 1 draft DECODE steps (layer-parallel under EasySpec) give d_2..d_k, each drawn by the
   sampler with the request's (seed, step) noise from the processed draft distribution q.
3. Verification: one target DECODE step over [x, d_1..d_k] (q_len = k_b + 1, causal within the block),
   then greedy or lossless speculative verification against the processed target distribution p.

The scheduler owns what follows (appending tokens with stop checks, the KV rollback).
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tpla_serve.engine.forward_batch import BatchEntry, ForwardMode
from tpla_serve.engine.request import Request
from tpla_serve.sampling.sampler import Sampler, SamplingBatch, adjusted_logits
from tpla_serve.spec.verify import VerifyUniforms, greedy_verify, processed_probs, speculative_verify

if TYPE_CHECKING:
    from tpla_serve.engine.model_runner import ModelRunner

_M32 = 0xFFFFFFFF


@dataclass
class BlockResult:
    """One request's verified block: the tokens to emit in order, with their logprobs when asked for."""

    tokens: list[int]  # accepted drafts, then the correction or bonus token
    num_drafts: int
    num_accepted: int
    logprobs: list[float] | None = None
    top_vals: list[list[float]] | None = None
    top_ids: list[list[int]] | None = None


@dataclass
class StepTiming:
    draft_seconds: float  # calibration + drafting, until the last draft token is on the host
    verify_seconds: float  # the target's block forward and verification


class SpeculativeDecoder:
    def __init__(
        self, runner: ModelRunner, sampler: Sampler, vocab_size: int, eos_token_ids: Collection[int]
    ) -> None:
        self.runner = runner
        self.sampler = sampler
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids

    def _batch(self, reqs: list[Request], drafts: list[list[int]], device: torch.device) -> SamplingBatch:
        """Rows for requests after their draft prefixes: penalties and steps see those tokens."""
        return SamplingBatch.build(
            [r.params for r in reqs],
            [r.output_ids + d for r, d in zip(reqs, drafts)],
            [r.seed for r in reqs],
            self.vocab_size,
            device,
            eos_token_ids=self.eos_token_ids,
        )

    def step(self, reqs: list[Request], num_drafts: list[int]) -> tuple[list[BlockResult], StepTiming]:
        """Run one block for every request; request b proposes num_drafts[b] >= 0 tokens.

        The caller has grown each request's pages to cover seq_len + num_drafts[b] tokens.
        """
        t0 = time.perf_counter()
        drafts, draft_probs = self._draft(reqs, num_drafts)
        t1 = time.perf_counter()
        results = self._verify(reqs, num_drafts, drafts, draft_probs)
        return results, StepTiming(t1 - t0, time.perf_counter() - t1)

    # ------------------------------------------------------------------ drafting

    def _draft(
        self, reqs: list[Request], num_drafts: list[int]
    ) -> tuple[list[list[int]], list[list[torch.Tensor]] | None]:
        """Draft tokens per request and, unless every request is greedy, the distributions q they were
        drawn from (one [V] row per token)."""
        drafts: list[list[int]] = [[] for _ in reqs]
        active = [b for b, k in enumerate(num_drafts) if k > 0]
        if not active:
            return drafts, None
        need_probs = not all(reqs[b].params.is_greedy for b in active)
        probs: list[list[torch.Tensor]] = [[] for _ in reqs]
        entries = []
        for b in active:
            req = reqs[b]
            entries.append(BatchEntry(req.tokens_from(req.draft_computed), req.draft_computed, list(req.pages)))
            req.draft_computed = req.seq_len
        logits = self.runner.draft_forward(ForwardMode.EXTEND, entries)
        for j in range(max(num_drafts)):
            rows = [reqs[b] for b in active]
            batch = self._batch(rows, [drafts[b] for b in active], logits.device)
            tokens = self.sampler(logits, batch).next_token_ids
            if need_probs:
                q = processed_probs(logits, batch)
                for i, b in enumerate(active):
                    probs[b].append(q[i])
            for b, tok in zip(active, tokens.tolist()):
                drafts[b].append(tok)
            active = [b for b in active if num_drafts[b] > j + 1]
            if not active:
                break
            entries = [
                BatchEntry([drafts[b][-1]], reqs[b].seq_len + j, list(reqs[b].pages)) for b in active
            ]
            logits = self.runner.draft_forward(ForwardMode.DECODE, entries)
        return drafts, probs if need_probs else None

    # ------------------------------------------------------------------ verification

    def _verify(
        self,
        reqs: list[Request],
        num_drafts: list[int],
        drafts: list[list[int]],
        draft_probs: list[list[torch.Tensor]] | None,
    ) -> list[BlockResult]:
        entries = [
            BatchEntry([r.last_token, *d], r.num_computed, list(r.pages), logits_for_all=True)
            for r, d in zip(reqs, drafts)
        ]
        logits = self.runner.forward(ForwardMode.DECODE, entries)  # [sum(k_b + 1), V]
        device = logits.device
        # Row (b, j): request b after its drafts d_1..d_j.
        row_reqs = [r for r, k in zip(reqs, num_drafts) for _ in range(k + 1)]
        row_drafts = [d[:j] for d, k in zip(drafts, num_drafts) for j in range(k + 1)]
        batch = self._batch(row_reqs, row_drafts, device)

        k_max = max(num_drafts)
        starts = torch.tensor(_row_starts(num_drafts), device=device)
        pos = torch.arange(k_max + 1, device=device)
        k_t = torch.tensor(num_drafts, device=device)
        pad_rows = starts[:, None] + torch.minimum(pos[None, :], k_t[:, None])  # [B, k_max+1]
        draft_t = torch.tensor([d + [0] * (k_max - len(d)) for d in drafts], dtype=torch.int64, device=device)

        if draft_probs is None:  # every request greedy
            target = adjusted_logits(logits, batch)[pad_rows]
            out = greedy_verify(target, draft_t, k_t)
        else:
            p = processed_probs(logits, batch)[pad_rows]
            q = torch.zeros(len(reqs), k_max, self.vocab_size, dtype=p.dtype, device=device)
            for b, rows in enumerate(draft_probs):
                if rows:
                    q[b, : len(rows)] = torch.stack(rows)
            seeds = [r.seed for r in reqs]
            uniforms = VerifyUniforms.from_seeds(
                torch.tensor([s & _M32 for s in seeds], device=device),
                torch.tensor([(s >> 32) & _M32 for s in seeds], device=device),
                torch.tensor([len(r.output_ids) for r in reqs], device=device),
                k_max,
            )
            out = speculative_verify(p, q, draft_t, uniforms, k_t)

        accepted = out.accepted_len.tolist()
        tokens = out.tokens.tolist()
        results = [
            BlockResult(tokens[b][: a + 1], num_drafts[b], a) for b, a in enumerate(accepted)
        ]
        if any(r.return_logprob for r in reqs):
            self._score(reqs, results, logits, _row_starts(num_drafts))
        return results

    def _score(
        self,
        reqs: list[Request],
        results: list[BlockResult],
        logits: torch.Tensor,
        starts: list[int],
    ) -> None:
        """Logprobs of each emitted token under the target's row it was drawn from."""
        rows = [starts[b] + i for b, res in enumerate(results) for i in range(len(res.tokens))]
        owners = [b for b, res in enumerate(results) for _ in res.tokens]
        prefix = [res.tokens[:i] for res in results for i in range(len(res.tokens))]
        batch = self._batch([reqs[b] for b in owners], prefix, logits.device)
        token_ids = torch.tensor([t for res in results for t in res.tokens], device=logits.device)
        nums = [reqs[b].top_logprobs_num for b in owners]
        out = self.sampler.score(logits[rows], batch, token_ids, nums)
        _, lps, vals, ids = out.tolist()
        i = 0
        for res in results:
            n = len(res.tokens)
            res.logprobs = lps[i : i + n]
            res.top_vals = vals[i : i + n] if vals is not None else None
            res.top_ids = ids[i : i + n] if ids is not None else None
            i += n


def _row_starts(num_drafts: list[int]) -> list[int]:
    """First logits row of each request's block of k_b + 1 rows."""
    starts, row = [], 0
    for k in num_drafts:
        starts.append(row)
        row += k + 1
    return starts
