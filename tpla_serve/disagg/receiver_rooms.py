"""A room one decode rank expects: where its KV goes, what has arrived so far, and what each message for
it must fit (layers this rank takes, token ranges in order, DONE only once every layer is complete)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tpla_serve.disagg.auth import RoomKeys
from tpla_serve.disagg.messages import Done, LayerKV

KVWriter = Callable[[int, int, torch.Tensor, torch.Tensor], None]
"""writer(layer, token_start, ckv, kpe) copies received KV into the room's pages. layer < kv.num_layers:
the target's, ckv [n, r/g]; kv.num_layers + i: the draft's layer i, ckv [n, draft r] (draft ranks only)."""


@dataclass
class ExpectedRoom:
    room: int
    n_tokens: int
    writer: KVWriter
    bootstrap: str
    keys: RoomKeys
    deadline: float
    next_start: list[int]  # per wire layer (target's, then draft's): tokens received so far
    nbytes: int = 0
    draft_nbytes: int = 0
    first_data: float | None = None

    def layer_problem(self, msg: LayerKV, num_target: int, rank: int) -> str | None:
        """Why an authenticated LAYER_KV contradicts the room (it fails), or None."""
        num_layers = len(self.next_start)
        if msg.layer >= num_layers:
            return (
                f"KV for layer {msg.layer} arrived, but rank {rank} takes {num_layers} layers "
                f"({num_target} of the model, {num_layers - num_target} of the draft)"
            )
        expected = self.next_start[msg.layer]
        end = msg.token_start + msg.n_tokens
        if msg.token_start != expected or end > self.n_tokens:
            return (
                f"layer {msg.layer}: tokens [{msg.token_start}, {end}) arrived, expected tokens from "
                f"{expected} of {self.n_tokens}"
            )
        return None

    def done_problem(self, msg: Done, num_target: int, rank: int) -> str | None:
        """Why an authenticated DONE comes too early or contradicts what arrived (the room fails), or None."""
        target_done = sum(n == self.n_tokens for n in self.next_start[:num_target])
        if target_done != num_target:
            return f"prefill finished the room after {target_done} of {num_target} layers reached rank {rank}"
        draft_layers = self.next_start[num_target:]
        if msg.draft_kv:
            if not draft_layers:
                return f"prefill says it sent draft KV to rank {rank}, which keeps no draft"
            draft_done = sum(n == self.n_tokens for n in draft_layers)
            if draft_done != len(draft_layers):
                return (
                    f"prefill finished the room after {draft_done} of {len(draft_layers)} draft layers "
                    f"reached rank {rank}"
                )
        elif any(draft_layers):
            return f"prefill sent draft KV to rank {rank} but finished the room without it"
        return None
