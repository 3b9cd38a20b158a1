"""The scheduler's counters as /metrics and get_server_info report them."""

from __future__ import annotations

from dataclasses import dataclass


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
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    cache_hit_rate: float = 0.0  # of all prompt tokens
    radix_cache_pages: int = 0  # pages the prefix cache holds
    spec_verify_steps: int = 0  # batched verification steps
    spec_verified_blocks: int = 0  # requests' blocks verified (a step verifies one per running request)
    spec_proposed_drafts: int = 0
    spec_accepted_drafts: int = 0
    spec_emitted_tokens: int = 0  # tokens verification steps produced (accepted drafts + bonus/correction)
    spec_draft_seconds: float = 0.0
    spec_verify_seconds: float = 0.0
    spec_accept_rate: float = 0.0  # accepted / proposed drafts
    spec_accept_length: float = 0.0  # mean tokens a request's block emits
