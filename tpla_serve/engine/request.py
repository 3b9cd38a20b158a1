"""A request's life inside the scheduler: its tokens, its pages, how far its KV is computed, its outputs."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from tpla_serve.engine.detokenizer import StopChecker
from tpla_serve.sampling.params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # an entity: `req in batch` compares identities, never token lists
class Request:
    """Invariant: the KV of all_ids[:num_computed] is in the cache, in `pages`; outputs are sampled from the
    logits of the last token of all_ids once num_computed == len(all_ids)."""

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
    num_computed: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: dict[str, Any] | None = None
    seed: int = 0  # per-request sampling seed (SGLang's sampling_seed, or drawn at random)
    # Logprobs as parallel lists (values, token ids); top-k as per-position lists, None where absent.
    input_logprobs: list[float | None] = field(default_factory=list)
    input_logprob_ids: list[int] = field(default_factory=list)
    input_top_vals: list[list[float] | None] = field(default_factory=list)
    input_top_ids: list[list[int] | None] = field(default_factory=list)
    output_logprobs: list[float | None] = field(default_factory=list)
    output_top_vals: list[list[float] | None] = field(default_factory=list)
    output_top_ids: list[list[int] | None] = field(default_factory=list)
    prompt_logprobs_done: bool = False
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    finish_time: float | None = None
    num_retractions: int = 0
    bootstrap_room: int | None = None  # PD prefill: the room this prompt's KV streams to
    # Speculative decoding: the draft model's KV is exact for all_ids[:draft_computed]; counters as SGLang
    # reports them (verification steps, drafts proposed, drafts accepted).
    speculative: bool = False
    draft_computed: int = 0
    spec_verify_ct: int = 0
    spec_num_proposed_drafts: int = 0
    spec_num_correct_drafts: int = 0

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
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.return_logprob and self.logprob_start_len >= 0 and not self.prompt_logprobs_done
