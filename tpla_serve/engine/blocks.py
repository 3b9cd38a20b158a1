"""What a speculative step hands the scheduler: each request's verified block, and the running totals.

The scheduler appends a block's tokens one by one through the request's stop checks and rolls back the
KV of rejected positions; the speculative decoder (tpla_serve.speculative) produces the blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from tpla_serve.engine.request import Request
from tpla_serve.forward_batch import BatchEntry
from tpla_serve.sampling.logprobs import TokenLogprobs


@dataclass
class BlockResult:
    """One request's verified block: the tokens to emit in order, with their logprobs when asked for."""

    tokens: list[int]  # accepted drafts, then the correction or bonus token
    num_drafts: int
    num_accepted: int
    logprobs: TokenLogprobs | None = None


@dataclass
class SpecCounters:
    """Totals over the server's life (scheduler stats, /metrics)."""

    verify_steps: int = 0  # batched verification steps
    blocks: int = 0  # requests' blocks verified (a step verifies one per request in it)
    proposed: int = 0
    accepted: int = 0
    emitted: int = 0  # accepted drafts + bonus/correction tokens
    draft_seconds: float = 0.0  # calibration + drafting, until the last draft token is on the host
    verify_seconds: float = 0.0  # the target's block forward and verification

    @property
    def accept_rate(self) -> float:
        """Accepted / proposed draft tokens."""
        return self.accepted / max(self.proposed, 1)

    @property
    def accept_length(self) -> float:
        """Mean tokens a request's verified block emits."""
        return self.emitted / max(self.blocks, 1)

    def stats_fields(self) -> dict[str, float]:
        """The spec_* fields of SchedulerStats."""
        return {
            "spec_verify_steps": self.verify_steps,
            "spec_verified_blocks": self.blocks,
            "spec_proposed_drafts": self.proposed,
            "spec_accepted_drafts": self.accepted,
            "spec_emitted_tokens": self.emitted,
            "spec_draft_seconds": self.draft_seconds,
            "spec_verify_seconds": self.verify_seconds,
            "spec_accept_rate": self.accept_rate,
            "spec_accept_length": self.accept_length,
        }


class BlockDecoder(Protocol):
    """Decodes verified blocks instead of single tokens (the scheduler's view of speculative decoding)."""

    counters: SpecCounters

    def prefill(self, entries: list[BatchEntry]) -> None:
        """The draft prefills the prompt chunks the target just prefilled (same pages)."""
        ...

    def step(self, reqs: list[Request], num_drafts: list[int]) -> list[BlockResult]:
        """One block per request, request b proposing num_drafts[b] >= 0 tokens; the caller has grown each
        request's pages to cover seq_len + num_drafts[b] tokens."""
        ...
