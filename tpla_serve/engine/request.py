"""A request's life inside the scheduler: its tokens, its pages, how far its KV is computed, its outputs."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from tpla_serve.cache.radix_cache import RadixNode
from tpla_serve.engine.detokenizer import IncrementalDetokenizer, StopChecker
from tpla_serve.grammar.backend import GrammarBackend, request_grammar
from tpla_serve.grammar.matcher import RequestGrammar
from tpla_serve.sampling.logprobs import TokenLogprobs, token_logprobs
from tpla_serve.sampling.params import SamplingParams
from tpla_serve.sampling.sampler import resolve_seed


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class RequestSpec:
    """What a client asks for: the scheduler validates it when the request is added (SGLang's fields)."""

    input_ids: list[int]
    params: SamplingParams
    rid: str | None = None
    return_logprob: bool = False
    logprob_start_len: int = -1  # SGLang: -1 = logprobs of output tokens only
    top_logprobs_num: int = 0
    stream: bool = False


@dataclass(frozen=True)
class RequestLimits:
    """What a request is checked against: the vocabulary, the context, the KV cache, a tokenizer."""

    vocab_size: int
    context_length: int
    max_total_tokens: int
    has_tokenizer: bool


def validate_request(spec: RequestSpec, limits: RequestLimits) -> SamplingParams:
    """Check a request against the server's limits; its sampling params with max_new_tokens resolved.
    Bad input raises ValueError naming the field."""
    prompt_ids = spec.input_ids
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token in text or input_ids")
    vocab = limits.vocab_size
    bad = [t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < vocab]
    if bad:
        raise ValueError(f"input_ids holds {bad[0]!r}, outside the vocabulary [0, {vocab})")
    limit = min(limits.context_length, limits.max_total_tokens)
    if len(prompt_ids) >= limit:
        raise ValueError(
            f"the prompt has {len(prompt_ids)} tokens; this server takes at most {limit - 1} "
            f"(context length {limits.context_length}, KV cache {limits.max_total_tokens} tokens)"
        )
    if not -1 <= spec.logprob_start_len < max(len(prompt_ids), 1):
        raise ValueError(f"logprob_start_len {spec.logprob_start_len} is outside [-1, {len(prompt_ids)})")
    if spec.top_logprobs_num < 0 or spec.top_logprobs_num > vocab:
        raise ValueError(f"top_logprobs_num must be in [0, {vocab}], got {spec.top_logprobs_num}")
    params = spec.params.validate_against(vocab, limit - len(prompt_ids))
    if params.stop and not limits.has_tokenizer:
        raise ValueError("stop: stop strings need a tokenizer; this engine runs without one")
    return params


class _NoText:
    """Stands in for a tokenizer when the engine runs on token ids alone (--skip-tokenizer-init)."""

    def decode(self, token_ids: list[int], **kwargs: object) -> str:
        return ""


def build_request(
    spec: RequestSpec,
    rid: str,
    limits: RequestLimits,
    tokenizer: Any | None,
    eos_token_ids: set[int],
    speculative: bool,
    grammar: GrammarBackend | None = None,
) -> Request:
    """A validated request: its params resolved against the limits, its stop checks, grammar matcher and
    seed set up."""
    params = validate_request(spec, limits)
    detok = IncrementalDetokenizer.for_request(tokenizer or _NoText(), params)
    return Request(
        rid=rid,
        prompt_ids=list(spec.input_ids),
        params=params,
        checker=StopChecker(params, detok, eos_token_ids, request_grammar(grammar, params)),
        return_logprob=spec.return_logprob,
        logprob_start_len=spec.logprob_start_len,
        top_logprobs_num=spec.top_logprobs_num,
        stream=spec.stream,
        seed=resolve_seed(params),
        speculative=speculative,
    )


@dataclass(eq=False)  # an entity: `req in batch` compares identities, never token lists
class Request:
    """Invariant: the KV of the first num_computed of its tokens is in the cache, in `pages`; a decode step
    runs once num_computed == total_len - 1 (everything but the newest token cached)."""

    rid: str
    prompt_ids: list[int]
    params: SamplingParams  # max_new_tokens resolved against the context
    checker: StopChecker  # decides when the output ends; owns the output text
    return_logprob: bool = False
    logprob_start_len: int = -1  # SGLang: -1 = logprobs of output tokens only
    top_logprobs_num: int = 0
    stream: bool = False
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    slot: int | None = None  # its row of the runner's request table while it runs (or is reserved)
    inflight: int = 0  # tokens sampled on the device that the host has not read yet (overlap scheduling)
    num_computed: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: dict[str, Any] | None = None
    seed: int = 0  # per-request sampling seed (SGLang's sampling_seed, or drawn at random)
    input_logprobs: TokenLogprobs = field(default_factory=TokenLogprobs)  # prompt positions asked for
    output_logprobs: TokenLogprobs = field(default_factory=TokenLogprobs)  # one per output token, when asked
    prompt_logprobs_done: bool = False
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    finish_time: float | None = None
    num_retractions: int = 0
    bootstrap_room: int | None = None  # PD prefill: the room this prompt's KV streams to
    # Prefix caching: prompt tokens whose KV came from the cache, the tree node whose path this request
    # reads (locked), and which of its pages the tree owns (never freed by the request).
    cached_tokens: int = 0
    prefix_node: RadixNode | None = None
    tree_pages: set[int] = field(default_factory=set)
    # Speculative decoding: the draft model's KV is exact for all_ids[:draft_computed]; counters as SGLang
    # reports them (verification steps, drafts proposed, drafts accepted).
    speculative: bool = False
    draft_computed: int = 0
    spec_verify_ct: int = 0
    spec_num_proposed_drafts: int = 0
    spec_num_correct_drafts: int = 0

    @property
    def grammar(self) -> RequestGrammar | None:
        """A constrained request's matcher (its stop checker advances it); None when unconstrained."""
        return self.checker.grammar

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    def tokens_from(self, start: int) -> list[int]:
        """all_ids[start:] without copying the whole prompt (decode steps run on long contexts)."""
        n = len(self.prompt_ids)
        return self.prompt_ids[start:] + self.output_ids if start < n else self.output_ids[start - n :]

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def total_len(self) -> int:
        """Its tokens, those still in flight to the host included."""
        return len(self.prompt_ids) + len(self.output_ids) + self.inflight

    @property
    def is_decoding(self) -> bool:
        """A request decodes once the KV of everything but its newest sampled token is cached."""
        return bool(self.output_ids or self.inflight) and self.num_computed == self.total_len - 1

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.return_logprob and self.logprob_start_len >= 0 and not self.prompt_logprobs_done

    def record_prompt_logprobs(self, logits: torch.Tensor, start: int, n: int) -> None:
        """A prompt chunk's logits: row i is position start + i, whose logits score prompt token
        start + i + 1."""
        prompt = self.prompt_ids
        first = self.logprob_start_len
        if start == 0 and first == 0:
            self.input_logprobs.append(prompt[0], None)
        rows = [i for i in range(n) if max(first, 1) <= start + i + 1 < len(prompt)]
        if rows:
            targets = [prompt[start + i + 1] for i in rows]
            values, top_vals, top_ids = token_logprobs(
                logits[rows], torch.tensor(targets, device=logits.device), self.top_logprobs_num
            )
            self.input_logprobs.extend(TokenLogprobs.from_tensors(targets, values, top_vals, top_ids))
        if start + n >= len(prompt):
            self.prompt_logprobs_done = True
