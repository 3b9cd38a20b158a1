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

A constrained request's drafts are drawn under its grammar's bitmasks and its verification rows masked
alike (grammar_block.py); a draft the grammar refuses, or one after the grammar completed, is never
proposed, so a block may hold fewer drafts than asked for.

The scheduler owns what follows (appending tokens with stop checks, the KV rollback).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Collection

import numpy as np
import torch

from tpla_serve.distributed import RunDraftBlock
from tpla_serve.engine.blocks import BlockResult, SpecCounters
from tpla_serve.engine.model_runner import ModelRunner
from tpla_serve.engine.request import Request
from tpla_serve.forward_batch import BatchEntry, ForwardMode
from tpla_serve.sampling.sampler import Sampler, SamplingBatch, adjusted_logits
from tpla_serve.speculative.draft import DraftModel
from tpla_serve.speculative.draft_loop import run_draft_block
from tpla_serve.speculative.draft_sampler import DraftSampler
from tpla_serve.speculative.grammar_block import BlockGrammars
from tpla_serve.speculative.verify import (
    VerifyUniforms,
    build_verify_batch,
    greedy_verify,
    processed_probs,
    speculative_verify,
)


class SpeculativeDecoder:
    """The scheduler's BlockDecoder: owns the draft model and runs the target through `runner`."""

    def __init__(
        self,
        runner: ModelRunner,
        draft: DraftModel,
        sampler: Sampler,
        vocab_size: int,
        eos_token_ids: Collection[int],
    ) -> None:
        self.runner = runner
        self.draft = draft
        self.sampler = sampler
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.counters = SpecCounters()

    def prefill(self, entries: list[BatchEntry]) -> None:
        """The draft prefills the chunks the target just prefilled, into its own pool's same pages."""
        self.draft.forward(ForwardMode.EXTEND, [BatchEntry(e.new_token_ids, e.prefix_len, e.pages) for e in entries])

    def step(self, reqs: list[Request], num_drafts: list[int]) -> list[BlockResult]:
        """Run one block for every request; request b proposes num_drafts[b] >= 0 tokens.

        The caller has grown each request's pages to cover seq_len + num_drafts[b] tokens.
        """
        t0 = time.perf_counter()
        grammars = BlockGrammars(reqs, num_drafts, self.vocab_size, self.runner.device)
        asked = num_drafts
        try:
            drafts, draft_probs = self._draft(reqs, num_drafts, grammars)
            num_drafts = [len(d) for d in drafts]
            t1 = time.perf_counter()
            results = self._verify(reqs, num_drafts, drafts, draft_probs, grammars)
        finally:
            grammars.rollback()  # the scheduler advances the matchers through the emitted tokens
        if self.draft.exact_drafting:  # the draft steps' KV of accepted drafts is exact already
            for req, k, res in zip(reqs, asked, results):
                if k > 0:
                    req.draft_computed += min(res.num_accepted, k - 1)
        c = self.counters
        c.verify_steps += 1
        c.blocks += len(reqs)
        c.proposed += sum(num_drafts)
        c.accepted += sum(r.num_accepted for r in results)
        c.emitted += sum(len(r.tokens) for r in results)
        c.draft_seconds += t1 - t0
        c.verify_seconds += time.perf_counter() - t1
        return results

    # ------------------------------------------------------------------ drafting

    def _draft(
        self, reqs: list[Request], num_drafts: list[int], grammars: BlockGrammars
    ) -> tuple[list[list[int]], torch.Tensor | None]:
        """Draft tokens per request (at most num_drafts[b]; fewer where the grammar ends them) and, unless
        every request is greedy, the distributions q they were drawn from, [B, k_max, V] (zero past a
        request's drafts)."""
        rows = [b for b, k in enumerate(num_drafts) if k > 0]
        if not rows:
            return [[] for _ in reqs], None
        block = [reqs[b] for b in rows]
        ks = [num_drafts[b] for b in rows]
        starts = [r.draft_computed for r in block]
        span = self.draft.calibration_tokens
        if span is not None and all(0 < r.seq_len - span <= r.draft_computed for r in block):
            # CUDA graphs replay calibrations of k + 1 tokens: rewriting exact KV again changes nothing
            starts = [r.seq_len - span for r in block]
        calibration = [BatchEntry(r.tokens_from(s), s, list(r.pages)) for r, s in zip(block, starts)]
        # A short calibration (after a block: its accepted drafts and bonus) runs as a decode step of
        # q_len <= k + 1, as verification does; a prompt's runs as prefill.
        longest = span or max(ks) + 1
        short = all(0 < e.prefix_len and len(e.new_token_ids) <= longest for e in calibration)
        tp = self.draft.tp if self.draft.layer_parallel else None
        table = self.runner.table
        op = RunDraftBlock(
            ForwardMode.DECODE if short else ForwardMode.EXTEND,
            calibration,
            np.array([r.slot for r in block], dtype=np.int64),
            np.array([r.seq_len for r in block], dtype=np.int64),
            np.array(ks, dtype=np.int64),
            table.take_delta() if tp is not None else table.pending_delta(),
        )
        source = DraftSampler(
            reqs, rows, ks, grammars, self.sampler, self.vocab_size, self.eos_token_ids, self.runner.device,
            broadcast=False,
        )
        if tp is not None:  # the other ranks take greedy drafts from their own logits, else rank 0's
            op = dataclasses.replace(op, local_argmax=source.argmax_only)
            source.broadcast = not source.argmax_only
        if tp is None:
            tokens = run_draft_block(self.draft, table, op, source)
        else:  # every rank drafts the block from this one message
            tp.announce(op)
            tokens = tp.collective(lambda: run_draft_block(self.draft, table, op, source))
        for req in block:
            req.draft_computed = req.seq_len
        drafts: list[list[int]] = [[] for _ in reqs]
        for b, row, n in zip(rows, tokens.tolist(), source.limit):
            drafts[b] = row[:n]
        q_block = source.draft_probs(source.limit)
        if q_block is None:
            return drafts, None
        q = q_block.new_zeros(len(reqs), *q_block.shape[1:])
        q[torch.tensor(rows, device=q.device)] = q_block
        return drafts, q

    # ------------------------------------------------------------------ verification

    def _verify(
        self,
        reqs: list[Request],
        num_drafts: list[int],
        drafts: list[list[int]],
        draft_probs: torch.Tensor | None,
        grammars: BlockGrammars,
    ) -> list[BlockResult]:
        entries = [
            BatchEntry([r.last_token, *d], r.num_computed, list(r.pages), logits_for_all=True)
            for r, d in zip(reqs, drafts)
        ]
        logits = self.runner.forward(ForwardMode.DECODE, entries)  # [sum(k_b + 1), V]
        device = logits.device
        # Row (b, j): request b after its drafts d_1..d_j, as the logits rows are laid out.
        batch = build_verify_batch(
            [r.params for r in reqs],
            [r.output_ids for r in reqs],
            [r.seed for r in reqs],
            drafts,
            [k + 1 for k in num_drafts],
            self.vocab_size,
            device,
            eos_token_ids=self.eos_token_ids,
        )
        if grammars.any:
            rows = [(b, j) for b, k in enumerate(num_drafts) for j in range(k + 1)]  # as the logits rows
            batch = dataclasses.replace(batch, grammar_mask=grammars.bitmask(rows))

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
            q = draft_probs[:, :k_max].to(p.dtype)
            # Row (b, 0) holds request b's seed and the step of its block's first token.
            uniforms = VerifyUniforms.from_seeds(
                batch.seeds_lo[starts], batch.seeds_hi[starts], batch.steps[starts], k_max
            )
            out = speculative_verify(p, q, draft_t, uniforms, k_t)

        accepted = out.accepted_len.tolist()
        tokens = out.tokens.tolist()
        results = [
            BlockResult(tokens[b][: a + 1], num_drafts[b], a) for b, a in enumerate(accepted)
        ]
        if any(r.return_logprob for r in reqs):
            self._score(reqs, num_drafts, results, logits, batch)
        return results

    def _score(
        self,
        reqs: list[Request],
        num_drafts: list[int],
        results: list[BlockResult],
        logits: torch.Tensor,
        batch: SamplingBatch,
    ) -> None:
        """Logprobs of each emitted token under the verification row it was drawn from: emitted token i
        of a block is d_{i+1} or the bonus/correction, scored by row (b, i), whose prefix d_1..d_i is the
        block's emitted tokens before it. Rows past a block's emitted tokens are scored and dropped."""
        token_ids = [
            res.tokens[j] if j < len(res.tokens) else 0 for res, k in zip(results, num_drafts) for j in range(k + 1)
        ]
        nums = [r.top_logprobs_num for r, k in zip(reqs, num_drafts) for _ in range(k + 1)]
        out = self.sampler.score(logits, batch, torch.tensor(token_ids, device=logits.device), nums)
        _, scored = out.tolist()
        assert scored is not None
        for res, start in zip(results, _row_starts(num_drafts)):
            res.logprobs = scored.slice(start, start + len(res.tokens))


def _row_starts(num_drafts: list[int]) -> list[int]:
    """First logits row of each request's block of k_b + 1 rows."""
    starts, row = [], 0
    for k in num_drafts:
        starts.append(row)
        row += k + 1
    return starts
