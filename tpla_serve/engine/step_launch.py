"""Running a scheduled batch: the model step, then the next tokens sampled on the device.

The sampled tokens become the requests' next inputs in the request table on every rank (no host round
trip), and their copy to the host starts at once; the scheduler reads them when it is ready (Launched).
Constrained requests are the exception: their next bitmask depends on the token in flight, so a decode
batch with one reads the pending step between its forward and its sampling (the forward still overlaps
the host's work, as in SGLang's delayed sampling).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from tpla_serve.engine.blocks import BlockDecoder
from tpla_serve.engine.model_runner import ModelRunner
from tpla_serve.engine.request import Request
from tpla_serve.engine.sampled import SampledTokens
from tpla_serve.forward_batch import BatchEntry, ForwardMode
from tpla_serve.grammar.matcher import grammar_bitmask
from tpla_serve.sampling.sampler import Sampler, SamplingBatch


class PromptKVForward(Protocol):
    """Runs the EXTEND steps of a PD prefill server: prompts with a bootstrap room stream their KV."""

    def forward(self, entries: list[BatchEntry], sample_slots: np.ndarray) -> torch.Tensor:
        """fp32 logits of the rows the entries ask for, as ModelRunner.forward gives them."""
        ...


@dataclass
class Launched:
    """A step whose tokens are sampled on the device: request i gets token i of `tokens`."""

    reqs: list[Request]
    tokens: SampledTokens


class StepLauncher:
    def __init__(
        self,
        runner: ModelRunner,
        vocab_size: int,
        eos_token_ids: Collection[int],
        spec: BlockDecoder | None,
        prompt_kv: PromptKVForward | None,
    ) -> None:
        self.runner = runner
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.spec = spec
        self.prompt_kv = prompt_kv
        self.sampler = Sampler()
        self._cached: tuple[tuple[Request, ...], SamplingBatch] | None = None  # the last decode batch's

    def extend(self, chosen: list[tuple[Request, int]]) -> tuple[list[Request], Launched | None]:
        """Prefill the chunks; sample the first token of every prompt that completes. Returns the requests
        whose prompt ended without sampling (prompt logprobs only: the caller finishes them) and the step."""
        entries = []
        for req, n in chosen:
            ids = req.tokens_from(req.num_computed)[:n]
            entries.append(
                BatchEntry(
                    ids, req.num_computed, list(req.pages), req.wants_prompt_logprobs, req.bootstrap_room,
                    # a room's first chunk after a cache hit streams the cached prefix too
                    0 if req.cached_tokens and req.num_computed == req.cached_tokens else None,
                )
            )
        completes = [req.num_computed + n == req.total_len and not req.checker.finished for req, n in chosen]
        sample_slots = np.array([req.slot for (req, _), c in zip(chosen, completes) if c], dtype=np.int64)
        if self.prompt_kv is not None:
            logits = self.prompt_kv.forward(entries, sample_slots)
        else:
            logits = self.runner.forward(ForwardMode.EXTEND, entries, sample_slots=sample_slots)
        if self.spec is not None:  # the draft prefills the same chunks into its own pool
            self.spec.prefill(entries)
            for req, n in chosen:
                req.draft_computed = req.num_computed + n
        row = 0
        done: list[Request] = []
        sample_reqs: list[Request] = []
        sample_rows: list[int] = []
        for (req, n), entry, complete in zip(chosen, entries, completes):
            rows = n if entry.logits_for_all else 1
            if entry.logits_for_all:
                req.record_prompt_logprobs(logits[row : row + rows], req.num_computed, n)
            req.num_computed += n
            if req.num_computed == req.total_len and req.checker.finished:  # prompt logprobs only
                done.append(req)
            elif complete:
                sample_reqs.append(req)
                sample_rows.append(row + rows - 1)
            row += rows
        if not sample_reqs:
            return done, None
        return done, self._sample(sample_reqs, logits[sample_rows], sample_slots)

    def decode(self, batch: list[Request], read_pending: Callable[[], None] | None = None) -> Launched:
        """One token per request, its inputs gathered from the request table on the device. read_pending
        brings the tokens still in flight to the host; a batch with a grammar calls it before sampling."""
        slots = np.array([r.slot for r in batch], dtype=np.int64)
        positions = np.array([r.num_computed for r in batch], dtype=np.int64)
        logits = self.runner.decode(slots, positions)
        for req in batch:
            req.num_computed += 1
        if read_pending is not None and any(r.grammar is not None for r in batch):
            read_pending()
        return self._sample(batch, logits, slots)

    def _sample(self, reqs: list[Request], logits: torch.Tensor, slots: np.ndarray) -> Launched:
        """Sample on the device, make the tokens the slots' next inputs on every rank, start their copy."""
        batch, top_nums = self._sampling_batch(reqs, logits.device)
        out = self.sampler(logits, batch, return_logprob=top_nums is not None, top_logprobs_nums=top_nums)
        self.runner.commit_tokens(slots, out.next_token_ids)
        for req in reqs:
            req.inflight += 1
        return Launched(reqs, SampledTokens(out))

    def _sampling_batch(
        self, reqs: list[Request], device: torch.device
    ) -> tuple[SamplingBatch, list[int] | None]:
        """The step's SamplingBatch, and each row's top-logprobs count when any row wants logprobs.

        A decode batch of the same requests as the last one (the steady state) reuses the last batch with
        every step counter one further: each request has one more token. Penalties and min_new_tokens
        masks depend on the tokens themselves, so batches with them are built anew. Grammar bitmasks are
        filled every step, by matchers that have accepted every token of their request.
        """
        key = tuple(reqs)  # compared by identity (requests are entities); held, so no id is reused
        cached = self._cached
        if cached is not None and cached[0] == key:
            batch = dataclasses.replace(cached[1], steps=cached[1].steps + 1)
        else:
            batch = SamplingBatch.build(
                [r.params for r in reqs],
                [r.output_ids for r in reqs],
                [r.seed for r in reqs],
                self.vocab_size,
                device,
                eos_token_ids=self.eos_token_ids,
                steps=[len(r.output_ids) + r.inflight for r in reqs],
            )
        reusable = batch.penalties is None and not any(
            len(r.output_ids) + r.inflight + 1 < r.params.min_new_tokens for r in reqs
        )
        self._cached = (key, batch) if reusable and batch.stop_mask is None else None
        grammars = [None if r.finished else r.grammar for r in reqs]
        if any(g is not None for g in grammars):
            if any(r.inflight for r, g in zip(reqs, grammars) if g is not None):
                raise RuntimeError("a grammar's next bitmask was asked for while its last token is in flight")
            mask = grammar_bitmask(grammars, self.vocab_size, device)
            batch = dataclasses.replace(batch, grammar_mask=mask)
        top_nums = None
        if any(r.return_logprob for r in reqs):
            top_nums = [r.top_logprobs_num if r.return_logprob else 0 for r in reqs]
        return batch, top_nums
