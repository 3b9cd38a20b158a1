"""Continuous batching: admit, chunk, batch, sample, finish, retract.

Each step is either one EXTEND batch (prompt chunks, exact MLA, up to --chunked-prefill-size tokens) or
one DECODE batch (one new token for every running request, or with speculative decoding one verified
block of up to k + 1 tokens). Prefill goes first so new requests join the running batch at the next step.
When pages run short, waiting requests stay queued and, if a decode step cannot grow, the newest running
request is retracted (its pages freed, recomputed later): no request is dropped and the engine never
fails for lack of memory.

Overlap scheduling (SGLang's; off with --disable-overlap-schedule, and never for speculative decoding): a
decode step's tokens are read one step late, while the next step already runs on the device, so the host's
work (appending, stop checks, building the next step) hides behind the device's. A request that finished
at step N still runs in step N + 1; that token is dropped, never shown. Each running request owns a slot
of the runner's request table: its pages and newest token live on the device, and a decode step's inputs
are gathered there.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque

from tpla_serve.cache.radix_cache import RadixCache
from tpla_serve.engine.blocks import BlockDecoder, BlockResult, SpecCounters
from tpla_serve.engine.model_runner import ModelRunner
from tpla_serve.engine.request import Request, RequestLimits, RequestSpec, RequestStatus, build_request
from tpla_serve.engine.request_memory import RequestMemory
from tpla_serve.engine.stats import SchedulerStats
from tpla_serve.engine.step_launch import Launched, PromptKVForward, StepLauncher
from tpla_serve.grammar.backend import GrammarBackend

logger = logging.getLogger(__name__)


class ServerFull(RuntimeError):
    """Every request slot is taken: the caller keeps the request until one frees."""


class Scheduler:
    """Rank 0's continuous batching over one model runner.

    spec: decodes verified blocks instead of single tokens (speculative decoding). prompt_kv: runs the
    prompt chunks of a PD prefill server, streaming their KV. grammar: compiles requests' constraints.
    """

    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: object | None,
        eos_token_ids: set[int] | None = None,
        spec: BlockDecoder | None = None,
        prompt_kv: PromptKVForward | None = None,
        grammar: GrammarBackend | None = None,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = runner.config
        self.allocator = runner.allocator
        self.page_size = runner.page_size
        self.vocab_size = runner.model_config.vocab_size
        self.eos_token_ids = set(eos_token_ids or ())
        self.spec = spec
        self.grammar = grammar
        self.limits = RequestLimits(
            self.vocab_size, runner.context_length, runner.max_total_tokens, tokenizer is not None
        )
        self.launcher = StepLauncher(runner, self.vocab_size, self.eos_token_ids, spec, prompt_kv)
        self.table = runner.table
        # Prefix caching on servers that prefill (a PD decode server's prompts arrive as KV).
        self.cache: RadixCache | None = None
        if not self.config.disable_radix_cache and self.config.disaggregation_mode != "decode":
            self.cache = RadixCache(self.allocator, self.page_size)
        self.memory = RequestMemory(self.allocator, self.table, self.page_size, self.cache)
        self.cached_prompt_tokens = 0
        # PD prefill servers sample one token per request and must send it at once; speculative blocks
        # need their tokens before the next block.
        config = self.config
        self.overlap = not (
            config.disable_overlap_schedule or spec is not None or config.disaggregation_mode == "prefill"
        )
        self.pending: Launched | None = None  # the decode step whose tokens the host has not read yet
        self._updated: list[Request] = []  # requests the current step() changed
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.prefilling: list[Request] = []  # running requests whose prompt is not all cached yet
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
        # max_new_tokens == 0: nothing to sample; with the prefix cache, the prompt is still computed so that
        # later prompts find it (the SGLang frontend caches a fork's or select's prefix this way)
        if req.checker.finished and not req.wants_prompt_logprobs and self.cache is None:
            self._finish(req, req.checker.finish_reason)
        else:
            self.waiting.append(req)
        return req

    def new_request(self, spec: RequestSpec) -> Request:
        """A validated request that nothing tracks yet (add_request queues it; PD decode adds it prefilled)."""
        rid = spec.rid or uuid.uuid4().hex
        if rid in self.requests:
            raise ValueError(f"rid {rid!r} is already in use")
        return build_request(
            spec, rid, self.limits, self.tokenizer, self.eos_token_ids, self.spec is not None, self.grammar
        )

    def add_prefilled(
        self,
        req: Request,
        pages: list[int],
        first_token: int,
        draft_kv: bool = False,
    ) -> None:
        """Start decoding a request whose prompt KV another server computed into `pages` (PD decode). The
        caller has recorded the first token's logprobs, when the request asked for logprobs.

        draft_kv: the prompt's draft KV arrived too (every rank that keeps a draft has it), so the first
        speculative step calibrates from the first token instead of prefilling the draft over the prompt.
        """
        if req.rid in self.requests:
            raise ValueError(f"rid {req.rid!r} is already in use")
        if req.slot is None:
            req.pages = pages
            if not self.memory.take_slot(req):
                raise ServerFull(f"all {self.table.max_slots} request slots are in use")
        req.pages = pages
        req.num_computed = len(req.prompt_ids)
        req.draft_computed = len(req.prompt_ids) if draft_kv and self.spec is not None else 0
        req.status = RequestStatus.RUNNING
        self.requests[req.rid] = req
        self.prompt_tokens += len(req.prompt_ids)
        self.running.append(req)
        self.table.set_token(req.slot, first_token)
        self._append_token(req, first_token, time.monotonic())

    def reserve(self, req: Request, num_tokens: int) -> list[int] | None:
        """A request that is not running yet takes pages for num_tokens and a slot (PD decode reserves them
        before its prompt's KV arrives); None, with nothing taken, when either is short."""
        return req.pages if self.memory.reserve(req, num_tokens) else None

    def unreserve(self, req: Request) -> None:
        """Give back what reserve() took, for a request that will not run."""
        self.memory.release(req)

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

    def flush_cache(self) -> tuple[bool, str]:
        """Empty the prefix cache; refused while requests run or wait (SGLang's rule)."""
        if self.has_work:
            return False, "Cache not flushed: requests are running or waiting; retry when the server is idle"
        freed = self.cache.reset() if self.cache is not None else 0
        return True, f"Cache flushed ({freed} pages freed)."

    def pop_finished(self, rid: str) -> Request:
        """Forget a finished request (its outputs have been delivered)."""
        req = self.requests.pop(rid)
        assert req.finished
        return req

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.pending)

    def stats(self) -> SchedulerStats:
        evictable = self.cache.evictable_pages if self.cache is not None else 0
        return SchedulerStats(
            num_waiting=len(self.waiting),
            num_running=len(self.running),
            # the prefix cache's unlocked pages count as free: they are evicted when a request needs them
            pages_used=self.allocator.num_used - evictable,
            pages_free=self.allocator.num_free + evictable,
            page_size=self.page_size,
            kv_bytes_per_token=self.runner.kv_bytes_per_token,
            max_total_tokens=self.runner.max_total_tokens,
            generated_tokens=self.generated_tokens,
            prompt_tokens=self.prompt_tokens,
            num_retractions=self.num_retractions,
            cached_prompt_tokens=self.cached_prompt_tokens,
            cache_hit_rate=self.cached_prompt_tokens / max(self.prompt_tokens, 1),
            radix_cache_pages=self.cache.num_pages if self.cache is not None else 0,
            **(self.spec.counters if self.spec is not None else SpecCounters()).stats_fields(),
        )

    # ------------------------------------------------------------------ one step

    def step(self) -> list[Request]:
        """Run one batch; returns the requests that got new tokens or finished in it (with overlap, those
        of the step before, whose tokens are read now)."""
        self._updated = []
        extend = self._schedule_extend()
        if extend:
            done, launched = self.launcher.extend(extend)
            for req, n in extend:  # computed prompt pages join the prefix cache, chunk by chunk
                if req.num_computed - n < len(req.prompt_ids):
                    self.memory.cache_prompt(req, min(req.num_computed, len(req.prompt_ids)))
            for req in done:
                self._finish(req, req.checker.finish_reason)
            self._updated.extend(done)
            self._read_pending()  # the last decode step's tokens, while the prompts run
            if launched is not None:
                self._read(launched)
        else:
            decode = self._schedule_decode()
            if decode and self.spec is not None:
                self._read_pending()
                self._run_spec_decode(decode)
            elif decode:
                if self.pending is not None and any(r.params.has_penalties for r in decode):
                    self._read_pending()  # penalties count a request's tokens on the host
                    decode = [r for r in decode if not r.finished]
                launched = self.launcher.decode(decode, read_pending=self._read_pending)
                self._read_pending()
                if self.overlap:
                    self.pending = launched
                else:
                    self._read(launched)
            else:
                self._read_pending()
        updated, self._updated = list(dict.fromkeys(self._updated)), []
        return updated

    def _schedule_extend(self) -> list[tuple[Request, int]]:
        budget = self.config.chunked_prefill_size if self.config.chunked_prefill_size > 0 else 1 << 62
        chosen: list[tuple[Request, int]] = []
        self.prefilling = [
            r for r in self.prefilling
            if r.status is RequestStatus.RUNNING and r.num_computed < r.total_len and not r.is_decoding
        ]
        for req in self.prefilling:
            n = min(req.total_len - req.num_computed, budget)
            if not self.memory.grow(req, req.num_computed + n):
                return chosen  # finish what is started before admitting more
            chosen.append((req, n))
            budget -= n
        deferred: list[Request] = []
        while self.waiting and budget > 0 and self.table.num_free > 0:
            req = self.waiting[0]
            self.memory.match_prefix(req)
            if self.memory.prefix_being_computed(req, self.prefilling):
                self.memory.unadmit(req)  # waits for the shared prefix instead of computing it a second time
                deferred.append(self.waiting.popleft())
                continue
            n = min(req.total_len - req.num_computed, budget)
            if not self.memory.grow(req, req.num_computed + n):
                self.memory.unadmit(req)  # stays queued until pages return
                break
            self.memory.take_slot(req)
            if req.num_retractions == 0:  # a retracted request's prompt was counted when it first ran
                self.cached_prompt_tokens += req.cached_tokens
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self.prefilling.append(req)
            chosen.append((req, n))
            budget -= n
        self.waiting.extendleft(reversed(deferred))
        return chosen

    def _num_drafts(self, req: Request) -> int:
        """Draft tokens a request proposes this step: k, fewer near its max_new_tokens (a block emits at
        most num_drafts + 1 tokens), so a block never reaches past the request's context."""
        if self.spec is None:
            return 0
        return max(0, min(self.num_draft_tokens, req.params.max_new_tokens - len(req.output_ids) - 1))

    def _schedule_decode(self) -> list[Request]:
        """Every running request that decodes; pages grown for the step (retracting the newest requests
        when the pool runs short). One pass of plain arithmetic per request: this runs every step."""
        page_size = self.page_size
        batch: list[Request] = []
        short: list[Request] = []  # need a page (or draft lookahead) before this step
        for r in self.running:
            n_out = len(r.output_ids) + r.inflight
            total = len(r.prompt_ids) + n_out
            if n_out == 0 or r.num_computed != total - 1 or n_out >= r.params.max_new_tokens:
                continue  # still prefilling, or its tokens in flight end it
            batch.append(r)
            if self.spec is not None or total > len(r.pages) * page_size:
                short.append(r)
        for req in short:
            lookahead = self._num_drafts(req)
            while req in batch and not self.memory.grow(req, req.total_len + lookahead):
                if lookahead and self.memory.grow(req, req.total_len):
                    break  # this step decodes it without drafts
                if self.pending is not None:  # the tokens in flight may end requests and free pages
                    self._read_pending()
                    batch = [r for r in batch if not r.finished]
                    continue
                victim = max(batch, key=lambda r: r.arrival_time)
                self._retract(victim)
                batch.remove(victim)
        return batch

    def _retract(self, req: Request) -> None:
        logger.info("KV pool full: retracting request %s (%d tokens) to recompute later", req.rid, req.seq_len)
        self.memory.unadmit(req)
        req.status = RequestStatus.WAITING
        req.num_retractions += 1
        self.num_retractions += 1
        self.running.remove(req)
        self.waiting.appendleft(req)

    # ------------------------------------------------------------------ execution

    def _read_pending(self) -> None:
        if self.pending is not None:
            launched, self.pending = self.pending, None
            self._read(launched)

    def _read(self, launched: Launched) -> None:
        """Append a step's tokens; a request that ended while its token was in flight drops it."""
        ids, logprobs = launched.tokens.result()
        now = time.monotonic()
        updated = self._updated
        for i, req in enumerate(launched.reqs):
            req.inflight -= 1
            if req.status is RequestStatus.FINISHED:
                continue
            if logprobs is not None and req.return_logprob:
                req.output_logprobs.append_from(logprobs, i)
            self._append_token(req, ids[i], now)
            updated.append(req)

    def _run_spec_decode(self, batch: list[Request]) -> None:
        """One verified block per request; rejected positions' KV is dropped, whole pages freed."""
        assert self.spec is not None
        num_drafts = [min(self._num_drafts(r), len(r.pages) * self.page_size - r.seq_len) for r in batch]
        results = self.spec.step(batch, num_drafts)
        now = time.monotonic()
        self._updated.extend(batch)
        for req, res in zip(batch, results):
            req.spec_verify_ct += 1
            req.spec_num_proposed_drafts += res.num_drafts
            req.spec_num_correct_drafts += res.num_accepted
            req.num_computed += 1 + res.num_accepted  # the last token and the accepted drafts
            self._append_block(req, res, now)
            if not req.finished:
                self.memory.trim(req, req.seq_len)

    def _append_block(self, req: Request, res: BlockResult, now: float) -> None:
        """Emit a block's tokens in order until the request finishes; nothing past a stop is emitted."""
        for i, tok in enumerate(res.tokens):
            if req.return_logprob and res.logprobs is not None:
                req.output_logprobs.append_from(res.logprobs, i)
            self._append_token(req, tok, now)
            if req.finished:
                return

    def _append_token(self, req: Request, tok: int, now: float) -> None:
        """The caller has recorded the token's logprob, when the request asked for logprobs."""
        req.output_ids.append(tok)
        self.generated_tokens += 1
        if req.first_token_time is None:
            req.first_token_time = now
        checker = req.checker
        checker.append((tok,))
        if checker.finish_reason is not None:
            self._finish(req, checker.finish_reason)

    def _finish(self, req: Request, reason: dict | None) -> None:
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        self.memory.release(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.finish_time = time.monotonic()
