"""Continuous batching: admit, chunk, batch, sample, finish, retract.

Each step is either one EXTEND batch (prompt chunks, exact MLA, up to --chunked-prefill-size tokens) or
one DECODE batch (one new token for every running request, or with speculative decoding one verified
block of up to k + 1 tokens). Prefill goes first so new requests join the running batch at the next step.
When pages run short, waiting requests stay queued and, if a decode step cannot grow, the newest running
request is retracted (its pages freed, recomputed later): no request is dropped and the engine never
fails for lack of memory.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass

import torch

from tpla_serve.engine.detokenizer import IncrementalDetokenizer, StopChecker
from tpla_serve.forward_batch import BatchEntry, ForwardMode
from tpla_serve.engine.model_runner import ModelRunner
from tpla_serve.engine.request import Request, RequestStatus
from tpla_serve.sampling.logprobs import token_logprobs
from tpla_serve.sampling.params import SamplingParams
from tpla_serve.sampling.sampler import Sampler, SamplingBatch, resolve_seed
from tpla_serve.speculative.decoder import BlockResult, SpecCounters, SpeculativeDecoder

logger = logging.getLogger(__name__)


@dataclass
class SchedulerStats:
    num_waiting: int
    num_running: int
    pages_used: int
    pages_free: int
    page_size: int
    kv_bytes_per_token: int
    max_total_tokens: int
    generated_tokens: int
    prompt_tokens: int
    num_retractions: int
    spec_verify_steps: int = 0  # batched verification steps
    spec_verified_blocks: int = 0  # requests' blocks verified (a step verifies one per running request)
    spec_proposed_drafts: int = 0
    spec_accepted_drafts: int = 0
    spec_emitted_tokens: int = 0  # tokens verification steps produced (accepted drafts + bonus/correction)
    spec_draft_seconds: float = 0.0
    spec_verify_seconds: float = 0.0
    spec_accept_rate: float = 0.0  # accepted / proposed drafts
    spec_accept_length: float = 0.0  # mean tokens a request's block emits


class _NoText:
    """Stands in for a tokenizer when the engine runs on token ids alone (--skip-tokenizer-init)."""

    def decode(self, token_ids: list[int], **kwargs: object) -> str:
        return ""


class Scheduler:
    def __init__(self, runner: ModelRunner, tokenizer: object | None, eos_token_ids: set[int] | None = None) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = runner.config
        self.allocator = runner.allocator
        self.page_size = runner.page_size
        self.vocab_size = runner.model_config.vocab_size
        self.eos_token_ids = set(eos_token_ids or ())
        self.sampler = Sampler()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.num_retractions = 0
        self.spec: SpeculativeDecoder | None = None
        if runner.draft is not None:
            self.spec = SpeculativeDecoder(runner, self.sampler, self.vocab_size, self.eos_token_ids)
        self.num_draft_tokens = self.config.speculative_num_draft_tokens

    # ------------------------------------------------------------------ admission

    def add_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        rid: str | None = None,
        return_logprob: bool = False,
        logprob_start_len: int = -1,
        top_logprobs_num: int = 0,
        stream: bool = False,
        bootstrap_room: int | None = None,
    ) -> Request:
        """Validate and queue a request. Bad input raises ValueError naming the field; nothing is queued.

        bootstrap_room (PD prefill): stream the prompt's KV to that room as it is computed.
        """
        req = self.new_request(
            prompt_ids, params, rid, return_logprob, logprob_start_len, top_logprobs_num, stream
        )
        req.bootstrap_room = bootstrap_room
        self.requests[req.rid] = req
        self.prompt_tokens += len(prompt_ids)
        if req.checker.finished and not req.wants_prompt_logprobs:  # max_new_tokens == 0: nothing to run
            self._finish(req, req.checker.finish_reason)
        else:
            self.waiting.append(req)
        return req

    def new_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        rid: str | None = None,
        return_logprob: bool = False,
        logprob_start_len: int = -1,
        top_logprobs_num: int = 0,
        stream: bool = False,
    ) -> Request:
        """A validated request that nothing tracks yet (add_request queues it; PD decode adds it prefilled)."""
        rid = rid or uuid.uuid4().hex
        if rid in self.requests:
            raise ValueError(f"rid {rid!r} is already in use")
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token in text or input_ids")
        bad = [t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"input_ids holds {bad[0]!r}, outside the vocabulary [0, {self.vocab_size})")
        limit = min(self.runner.context_length, self.runner.max_total_tokens)
        if len(prompt_ids) >= limit:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; this server takes at most {limit - 1} "
                f"(context length {self.runner.context_length}, KV cache {self.runner.max_total_tokens} tokens)"
            )
        if not -1 <= logprob_start_len < max(len(prompt_ids), 1):
            raise ValueError(f"logprob_start_len {logprob_start_len} is outside [-1, {len(prompt_ids)})")
        if top_logprobs_num < 0 or top_logprobs_num > self.vocab_size:
            raise ValueError(f"top_logprobs_num must be in [0, {self.vocab_size}], got {top_logprobs_num}")
        params = params.validate_against(self.vocab_size, limit - len(prompt_ids))
        if params.stop and self.tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer; this engine runs without one")
        detok = IncrementalDetokenizer.for_request(self.tokenizer or _NoText(), params)
        req = Request(
            rid=rid,
            prompt_ids=list(prompt_ids),
            params=params,
            checker=StopChecker(params, detok, self.eos_token_ids),
            return_logprob=return_logprob,
            logprob_start_len=logprob_start_len,
            top_logprobs_num=top_logprobs_num,
            stream=stream,
            seed=resolve_seed(params),
            speculative=self.spec is not None,
        )
        return req

    def add_prefilled(
        self,
        req: Request,
        pages: list[int],
        first_token: int,
        first_logprob: float | None,
        draft_kv: bool = False,
    ) -> None:
        """Start decoding a request whose prompt KV another server computed into `pages` (PD decode).

        draft_kv: the prompt's draft KV arrived too (every rank that keeps a draft has it), so the first
        speculative step calibrates from the first token instead of prefilling the draft over the prompt.
        """
        if req.rid in self.requests:
            raise ValueError(f"rid {req.rid!r} is already in use")
        req.pages = pages
        req.num_computed = len(req.prompt_ids)
        req.draft_computed = len(req.prompt_ids) if draft_kv and self.spec is not None else 0
        req.status = RequestStatus.RUNNING
        self.requests[req.rid] = req
        self.prompt_tokens += len(req.prompt_ids)
        self.running.append(req)
        self._append_token(req, first_token, first_logprob, None, None, time.monotonic())

    def add_aborted(self, req: Request, message: str) -> None:
        """Track a request that ended before it ran (PD: its KV never came), so its output can be reported."""
        if req.rid in self.requests:
            raise ValueError(f"rid {req.rid!r} is already in use")
        self.requests[req.rid] = req
        req.checker.abort(message)
        self._finish(req, req.checker.finish_reason)

    def abort(self, rid: str, message: str = "aborted by request") -> Request | None:
        """End a request wherever it is; its pages return to the pool at once."""
        req = self.requests.get(rid)
        if req is None or req.finished:
            return None
        if req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        req.checker.abort(message)
        self._finish(req, req.checker.finish_reason)
        return req

    def pop_finished(self, rid: str) -> Request:
        """Forget a finished request (its outputs have been delivered)."""
        req = self.requests.pop(rid)
        assert req.finished
        return req

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> SchedulerStats:
        spec = self.spec.counters if self.spec is not None else SpecCounters()
        return SchedulerStats(
            num_waiting=len(self.waiting),
            num_running=len(self.running),
            pages_used=self.allocator.num_used,
            pages_free=self.allocator.num_free,
            page_size=self.page_size,
            kv_bytes_per_token=self.runner.kv_bytes_per_token,
            max_total_tokens=self.runner.max_total_tokens,
            generated_tokens=self.generated_tokens,
            prompt_tokens=self.prompt_tokens,
            num_retractions=self.num_retractions,
            spec_verify_steps=spec.verify_steps,
            spec_verified_blocks=spec.blocks,
            spec_proposed_drafts=spec.proposed,
            spec_accepted_drafts=spec.accepted,
            spec_emitted_tokens=spec.emitted,
            spec_draft_seconds=spec.draft_seconds,
            spec_verify_seconds=spec.verify_seconds,
            spec_accept_rate=spec.accept_rate,
            spec_accept_length=spec.accept_length,
        )

    # ------------------------------------------------------------------ one step

    def step(self) -> list[Request]:
        """Run one batch; returns the requests that got new tokens or finished in it."""
        extend = self._schedule_extend()
        if extend:
            return self._run_extend(extend)
        decode = self._schedule_decode()
        if decode:
            return self._run_decode(decode)
        return []

    def _pages_needed(self, req: Request, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.page_size) - len(req.pages))

    def _grow(self, req: Request, num_tokens: int) -> bool:
        """Make req's pages cover num_tokens tokens; False (nothing taken) if the pool is short."""
        need = self._pages_needed(req, num_tokens)
        if need == 0:
            return True
        pages = self.allocator.alloc(need)
        if pages is None:
            return False
        req.pages.extend(pages)
        return True

    def _schedule_extend(self) -> list[tuple[Request, int]]:
        budget = self.config.chunked_prefill_size if self.config.chunked_prefill_size > 0 else 1 << 62
        chosen: list[tuple[Request, int]] = []
        partial = [r for r in self.running if r.num_computed < r.seq_len and not self._is_decoding(r)]
        for req in partial:
            n = min(req.seq_len - req.num_computed, budget)
            if not self._grow(req, req.num_computed + n):
                return chosen  # finish what is started before admitting more
            chosen.append((req, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running_requests:
            req = self.waiting[0]
            n = min(req.seq_len, budget)
            if not self._grow(req, n):
                break  # stays queued until pages return
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            chosen.append((req, n))
            budget -= n
        return chosen

    @staticmethod
    def _is_decoding(req: Request) -> bool:
        """A request decodes once the KV of everything but its newest sampled token is cached."""
        return bool(req.output_ids) and req.num_computed == req.seq_len - 1

    def _num_drafts(self, req: Request) -> int:
        """Draft tokens a request proposes this step: k, fewer near its max_new_tokens (a block emits at
        most num_drafts + 1 tokens), so a block never reaches past the request's context."""
        if self.spec is None:
            return 0
        return max(0, min(self.num_draft_tokens, req.params.max_new_tokens - len(req.output_ids) - 1))

    def _schedule_decode(self) -> list[Request]:
        batch = [r for r in self.running if self._is_decoding(r)]
        for req in list(batch):
            lookahead = self._num_drafts(req)
            while req in batch and not self._grow(req, req.seq_len + lookahead):
                if lookahead and self._grow(req, req.seq_len):
                    break  # this step decodes it without drafts
                victim = max(batch, key=lambda r: r.arrival_time)
                self._retract(victim)
                batch.remove(victim)
        return batch

    def _retract(self, req: Request) -> None:
        logger.info("KV pool full: retracting request %s (%d tokens) to recompute later", req.rid, req.seq_len)
        self.allocator.free(req.pages)
        req.pages = []
        req.num_computed = 0
        req.draft_computed = 0
        req.status = RequestStatus.WAITING
        req.num_retractions += 1
        self.num_retractions += 1
        self.running.remove(req)
        self.waiting.appendleft(req)

    # ------------------------------------------------------------------ execution

    def _run_extend(self, chosen: list[tuple[Request, int]]) -> list[Request]:
        entries = []
        for req, n in chosen:
            ids = req.tokens_from(req.num_computed)[:n]
            entries.append(
                BatchEntry(ids, req.num_computed, list(req.pages), req.wants_prompt_logprobs, req.bootstrap_room)
            )
        logits = self.runner.forward(ForwardMode.EXTEND, entries)
        if self.spec is not None:  # the draft prefills the same chunks into its own pool
            self.runner.draft_forward(
                ForwardMode.EXTEND, [BatchEntry(e.new_token_ids, e.prefix_len, e.pages) for e in entries]
            )
            for req, n in chosen:
                req.draft_computed = req.num_computed + n
        row = 0
        sample_reqs: list[Request] = []
        sample_rows: list[int] = []
        for (req, n), entry in zip(chosen, entries):
            rows = n if entry.logits_for_all else 1
            if entry.logits_for_all:
                self._record_prompt_logprobs(req, logits[row : row + rows], req.num_computed, n)
            req.num_computed += n
            if req.num_computed == req.seq_len and req.checker.finished:  # prompt logprobs only
                self._finish(req, req.checker.finish_reason)
            elif req.num_computed == req.seq_len:
                sample_reqs.append(req)
                sample_rows.append(row + rows - 1)
            row += rows
        if sample_reqs:
            self._sample_and_append(sample_reqs, logits[sample_rows])
        return [r for r, _ in chosen if r in sample_reqs or r.finished]

    def _run_decode(self, batch: list[Request]) -> list[Request]:
        if self.spec is not None:
            return self._run_spec_decode(batch)
        entries = [BatchEntry([r.last_token], r.num_computed, list(r.pages)) for r in batch]
        logits = self.runner.forward(ForwardMode.DECODE, entries)
        for req in batch:
            req.num_computed += 1
        self._sample_and_append(batch, logits)
        return batch

    def _run_spec_decode(self, batch: list[Request]) -> list[Request]:
        """One verified block per request; rejected positions' KV is dropped, whole pages freed."""
        assert self.spec is not None
        num_drafts = [min(self._num_drafts(r), len(r.pages) * self.page_size - r.seq_len) for r in batch]
        results = self.spec.step(batch, num_drafts)
        now = time.monotonic()
        for req, res in zip(batch, results):
            req.spec_verify_ct += 1
            req.spec_num_proposed_drafts += res.num_drafts
            req.spec_num_correct_drafts += res.num_accepted
            req.num_computed += 1 + res.num_accepted  # the last token and the accepted drafts
            self._append_block(req, res, now)
            if not req.finished:
                keep = -(-req.seq_len // self.page_size)
                if len(req.pages) > keep:
                    self.allocator.free(req.pages[keep:])
                    del req.pages[keep:]
        return batch

    def _append_block(self, req: Request, res: BlockResult, now: float) -> None:
        """Emit a block's tokens in order until the request finishes; nothing past a stop is emitted."""
        for i, tok in enumerate(res.tokens):
            self._append_token(
                req,
                tok,
                res.logprobs[i] if res.logprobs is not None else None,
                res.top_vals[i] if res.top_vals is not None else None,
                res.top_ids[i] if res.top_ids is not None else None,
                now,
            )
            if req.finished:
                return

    def _record_prompt_logprobs(self, req: Request, logits: torch.Tensor, start: int, n: int) -> None:
        """Row i of this chunk is position start + i, whose logits score prompt token start + i + 1."""
        prompt = req.prompt_ids
        first = req.logprob_start_len
        if start == 0 and first == 0:
            req.input_logprobs.append(None)
            req.input_logprob_ids.append(prompt[0])
            req.input_top_vals.append(None)
            req.input_top_ids.append(None)
        rows = [i for i in range(n) if max(first, 1) <= start + i + 1 < len(prompt)]
        if rows:
            targets = torch.tensor([prompt[start + i + 1] for i in rows], device=logits.device)
            values, top_vals, top_ids = token_logprobs(logits[rows], targets, req.top_logprobs_num)
            req.input_logprobs.extend(values.tolist())
            req.input_logprob_ids.extend(targets.tolist())
            req.input_top_vals.extend(top_vals.tolist() if top_vals is not None else [None] * len(rows))
            req.input_top_ids.extend(top_ids.tolist() if top_ids is not None else [None] * len(rows))
        if start + n >= len(prompt):
            req.prompt_logprobs_done = True

    def _sample_and_append(self, reqs: list[Request], logits: torch.Tensor) -> None:
        batch = SamplingBatch.build(
            [r.params for r in reqs],
            [r.output_ids for r in reqs],
            [r.seed for r in reqs],
            self.vocab_size,
            logits.device,
            eos_token_ids=self.eos_token_ids,
        )
        want_logprob = any(r.return_logprob for r in reqs)
        top_nums = [r.top_logprobs_num if r.return_logprob else 0 for r in reqs]
        out = self.sampler(logits, batch, return_logprob=want_logprob, top_logprobs_nums=top_nums)
        ids, logprobs, top_vals, top_ids = out.tolist()
        now = time.monotonic()
        for i, req in enumerate(reqs):
            self._append_token(
                req,
                ids[i],
                logprobs[i] if logprobs is not None else None,
                top_vals[i] if top_vals is not None else None,
                top_ids[i] if top_ids is not None else None,
                now,
            )

    def _append_token(
        self,
        req: Request,
        tok: int,
        logprob: float | None,
        top_vals: list[float] | None,
        top_ids: list[int] | None,
        now: float,
    ) -> None:
        req.output_ids.append(tok)
        self.generated_tokens += 1
        if req.first_token_time is None:
            req.first_token_time = now
        if req.return_logprob:
            req.output_logprobs.append(logprob)
            req.output_top_vals.append(top_vals)
            req.output_top_ids.append(top_ids)
        req.checker.append([tok])
        if req.checker.finished:
            self._finish(req, req.checker.finish_reason)

    def _finish(self, req: Request, reason: dict | None) -> None:
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        if req.pages:
            self.allocator.free(req.pages)
            req.pages = []
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.finish_time = time.monotonic()
