"""A room one decode rank expects: where its KV goes, what has arrived so far, and what each message for
it must fit (layers this rank takes, token ranges in order, DONE only once every layer is complete)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from tpla_serve.disagg.auth import RoomKeys
from tpla_serve.disagg.handshake import DecodeLayout
from tpla_serve.disagg.messages import Done, LayerKV
from tpla_serve.disagg.staging import StagingPool
from tpla_serve.disagg.transport import Landing

logger = logging.getLogger(__name__)

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
    lanes: int = 1  # connections the prefill spreads layers over: DONE may overtake other lanes' layers
    nbytes: int = 0
    draft_nbytes: int = 0
    first_data: float | None = None
    done: Done | None = None  # a DONE that arrived before layers of other lanes
    live: bool = True  # False once the room ended: no byte goes into its pages after that
    lock: threading.Lock = field(default_factory=threading.Lock)  # held while bytes go into its pages

    def is_live(self) -> bool:
        return self.live

    def end(self) -> None:
        """No more bytes for this room's pages; waits for a write in progress."""
        with self.lock:
            self.live = False

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


LayerDone = Callable[[int, "str | None"], None]
"""on_layer(payload bytes, problem): a chunk has landed (problem None), or why it ends the room."""


def layer_landing(
    state: ExpectedRoom, msg: LayerKV, sizes: Sequence[int], layout: DecodeLayout, staging: StagingPool,
    on_layer: LayerDone,
) -> tuple[Landing | None, str | None]:
    """Where a checked LAYER_KV chunk goes: the writer's pages in place when it offers host_segments, else
    a staging buffer handed to the writer once full. (None, why) when its frame sizes are not the layer's."""
    if msg.layer >= layout.kv.num_layers:
        assert layout.draft is not None  # num_wire_layers counts draft layers only with a draft
        spec, ckv_width = layout.draft, layout.draft.kv_lora_rank
    else:
        spec, ckv_width = layout.kv, layout.ckv_width
    n, isz = msg.n_tokens, spec.itemsize
    expected = [n * ckv_width * isz, n * spec.rope_dim * isz]
    if list(sizes) != expected:
        return None, f"bad KV frame for layer {msg.layer}: {list(sizes)} bytes, expected {expected}"
    nbytes = sum(expected)
    host = getattr(state.writer, "host_segments", None)
    segments = host(msg.layer, msg.token_start, n) if host is not None else None
    if segments is not None:
        return Landing(segments, state.lock, state.is_live, lambda: on_layer(nbytes, None),
                       lambda why: on_layer(0, f"KV for layer {msg.layer} broke off: {why}")), None
    buf = staging.acquire(nbytes)
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            staging.release(buf)

    def finish() -> None:
        ckv = buf[: expected[0]].view(spec.torch_dtype).view(n, ckv_width)
        kpe = buf[expected[0] :].view(spec.torch_dtype).view(n, spec.rope_dim)
        problem = None
        with state.lock:
            if state.live:
                try:
                    staged = getattr(state.writer, "write_staged", None)
                    if staged is not None:
                        staged(msg.layer, msg.token_start, ckv, kpe, buf)
                    else:
                        state.writer(msg.layer, msg.token_start, ckv, kpe)
                except Exception as exc:  # the engine's writer failing ends this room, not the receiver
                    logger.exception("writer failed for room %d", state.room)
                    problem = f"writing KV failed: {exc}"
        release()
        on_layer(nbytes, problem)

    def abandon(why: str) -> None:
        release()
        on_layer(0, f"KV for layer {msg.layer} broke off: {why}")

    return Landing([memoryview(buf.numpy())], state.lock, state.is_live, finish, abandon), None
