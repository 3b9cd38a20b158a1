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
from typing import Protocol

import torch

from tpla_serve.engine.blocks import BlockDecoder, BlockResult, SpecCounters
from tpla_serve.engine.detokenizer import IncrementalDetokenizer, StopChecker
from tpla_serve.engine.model_runner import ModelRunner
from tpla_serve.engine.request import Request, RequestLimits, RequestSpec, RequestStatus, validate_request
from tpla_serve.engine.stats import SchedulerStats
from tpla_serve.forward_batch import BatchEntry, ForwardMode
from tpla_serve.sampling.sampler import Sampler, SamplingBatch, resolve_seed

logger = logging.getLogger(__name__)


class PromptKVForward(Protocol):
    """Runs the EXTEND steps of a PD prefill server: prompts with a bootstrap room stream their KV."""

    def forward(self, entries: list[BatchEntry]) -> torch.Tensor:
        """fp32 logits of the rows the entries ask for, as ModelRunner.forward gives them."""
        ...


class _NoText:
    """Stands in for a tokenizer when the engine runs on token ids alone (--skip-tokenizer-init)."""

    def decode(self, token_ids: list[int], **kwargs: object) -> str:
        return ""


class Scheduler:
    """Rank 0's continuous batching over one model runner.

    spec: decodes verified blocks instead of single tokens (speculative decoding). prompt_kv: runs the
    prompt chunks of a PD prefill server, streaming their KV.
    """

    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: object | None,
        eos_token_ids: set[int] | None = None,
        spec: BlockDecoder | None = None,
        prompt_kv: PromptKVForward | None = None,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = runner.config
        self.allocator = runner.allocator
        self.page_size = runner.page_size
        self.vocab_size = runner.model_config.vocab_size
        self.eos_token_ids = set(eos_token_ids or ())
        self.sampler = Sampler()
        self.spec = spec
        self.prompt_kv = prompt_kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.num_retractions = 0
        self.num_draft_tokens = self.config.speculative_num_draft_tokens

    # ------------------------------------------------------------------ admission

    def add_request(self, spec: RequestSpec, bootstrap_room: int | None = None) -> Request:
        """Validate and queue a request. Bad input raises ValueError naming the field; nothing is queued.

        bootstrap_room (PD prefill): stream the prompt's KV to that room as it is computed.
        """
        req = self.new_request(spec)
        req.bootstrap_room = bootstrap_room
        self.requests[req.rid] = req
        self.prompt_tokens += len(req.prompt_ids)
        if req.checker.finished and not req.wants_prompt_logprobs:  # max_new_tokens == 0: nothing to run
            self._finish(req, req.checker.finish_reason)
        else:
            self.waiting.append(req)
        return req

    def new_request(self, spec: RequestSpec) -> Request:
        """A validated request that nothing tracks yet (add_request queues it; PD decode adds it prefilled)."""
        rid = spec.rid or uuid.uuid4().hex
        if rid in self.requests:
            raise ValueError(f"rid {rid!r} is already in use")
        limits = RequestLimits(
            self.vocab_size, self.runner.context_length, self.runner.max_total_tokens, self.tokenizer is not None
        )
        params = validate_request(spec, limits)
        detok = IncrementalDetokenizer.for_request(self.tokenizer or _NoText(), params)
        return Request(
            rid=rid,
            prompt_ids=list(spec.input_ids),
            params=params,
            checker=StopChecker(params, detok, self.eos_token_ids),
            return_logprob=spec.return_logprob,
            logprob_start_len=spec.logprob_start_len,
            top_logprobs_num=spec.top_logprobs_num,
            stream=spec.stream,
            seed=resolve_seed(params),
            speculative=self.spec is not None,
        )

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
        if req.return_logprob:
            req.output_logprobs.append(first_token, first_logprob)
        self._append_token(req, first_token, time.monotonic())

    def add_aborted(
        self, req: Request, message: str, status_code: int | None = None, err_type: str | None = None
    ) -> None:
        """Track a request that ended before it ran (PD: its KV never came), so its output can be reported."""
        if req.rid in self.requests:
            raise ValueError(f"rid {req.rid!r} is already in use")
        self.requests[req.rid] = req
        req.checker.abort(message, status_code, err_type)
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
            **(self.spec.counters if self.spec is not None else SpecCounters()).stats_fields(),
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
        if self.prompt_kv is not None:
            logits = self.prompt_kv.forward(entries)
        else:
            logits = self.runner.forward(ForwardMode.EXTEND, entries)
        if self.spec is not None:  # the draft prefills the same chunks into its own pool
            self.spec.prefill(entries)
            for req, n in chosen:
                req.draft_computed = req.num_computed + n
        row = 0
        sample_reqs: list[Request] = []
        sample_rows: list[int] = []
        for (req, n), entry in zip(chosen, entries):
            rows = n if entry.logits_for_all else 1
            if entry.logits_for_all:
                req.record_prompt_logprobs(logits[row : row + rows], req.num_computed, n)
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
            if req.return_logprob and res.logprobs is not None:
                req.output_logprobs.append_from(res.logprobs, i)
            self._append_token(req, tok, now)
            if req.finished:
                return

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
        ids, logprobs = out.tolist()
        now = time.monotonic()
        for i, req in enumerate(reqs):
            if req.return_logprob and logprobs is not None:
                req.output_logprobs.append_from(logprobs, i)
            self._append_token(req, ids[i], now)

    def _append_token(self, req: Request, tok: int, now: float) -> None:
        """The caller has recorded the token's logprob, when the request asked for logprobs."""
        req.output_ids.append(tok)
        self.generated_tokens += 1
        if req.first_token_time is None:
            req.first_token_time = now
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
