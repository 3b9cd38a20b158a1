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
        """No more bytes for this room's pages; waits for a write in progress, and for the device copies
        of a writer that queues them (`flush`)."""
        with self.lock:
            self.live = False
            flush = getattr(self.writer, "flush", None)
            if flush is not None:
                flush()

    def layer_problem(self, msg: LayerKV, num_target: int, rank: int) -> str | None:
        """Why an authenticated LAYER_KV contradicts the room (it fails), or None."""
        num_layers = len(self.next_start)
        last = msg.layer + msg.n_layers - 1
        if last >= num_layers:
            return (
                f"KV for layer {last} arrived, but rank {rank} takes {num_layers} layers "
                f"({num_target} of the model, {num_layers - num_target} of the draft)"
            )
        end = msg.token_start + msg.n_tokens
        for layer in range(msg.layer, last + 1):
            expected = self.next_start[layer]
            if msg.token_start != expected or end > self.n_tokens:
                return (
                    f"layer {layer}: tokens [{msg.token_start}, {end}) arrived, expected tokens from "
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
    a staging buffer handed to the writer once full. (None, why) when its frame sizes are not the layers'."""
    n, layers = msg.n_tokens, range(msg.layer, msg.layer + msg.n_layers)
    shapes = []  # per layer: (dtype, ĉ width, k_pe width)
    for layer in layers:
        if layer >= layout.kv.num_layers:
            assert layout.draft is not None  # num_wire_layers counts draft layers only with a draft
            shapes.append((layout.draft.torch_dtype, layout.draft.kv_lora_rank, layout.draft.rope_dim))
        else:
            shapes.append((layout.kv.torch_dtype, layout.ckv_width, layout.kv.rope_dim))
    expected = [n * w * dt.itemsize for dt, cw, rw in shapes for w in (cw, rw)]
    if list(sizes) != expected:
        return None, f"bad KV frame for layer {msg.layer}: {list(sizes)} bytes, expected {expected}"
    nbytes = sum(expected)
    host = getattr(state.writer, "host_segments", None)
    if host is not None:
        segments = host(layers, msg.token_start, n)
        if segments is not None:
            return Landing(segments, state.lock, state.is_live, lambda: on_layer(nbytes, None),
                           lambda why: on_layer(0, f"KV for layer {msg.layer} broke off: {why}")), None
    buf = staging.acquire(nbytes)
    released = threading.Lock()

    def release() -> None:
        if released.acquire(blocking=False):
            staging.release(buf)

    def finish() -> None:
        problem, offset, handed = None, 0, False
        with state.lock:
            if state.live:
                try:
                    land = getattr(state.writer, "land_staged", None)
                    if land is not None:  # the writer gives the buffer back once its copies ran
                        handed = True
                        land([(layer, *shape) for layer, shape in zip(layers, shapes)], msg.token_start, n,
                             buf, release)
                    else:
                        for layer, (dt, cw, rw) in zip(layers, shapes):
                            a, b, c = offset, offset + n * cw * dt.itemsize, offset + n * (cw + rw) * dt.itemsize
                            offset = c
                            state.writer(layer, msg.token_start, buf[a:b].view(dt).view(n, cw),
                                         buf[b:c].view(dt).view(n, rw))
                except Exception as exc:  # the engine's writer failing ends this room, not the receiver
                    logger.exception("writer failed for room %d", state.room)
                    problem = f"writing KV failed: {exc}"
        if not handed or problem is not None:
            release()
        on_layer(nbytes, problem)

    def abandon(why: str) -> None:
        release()
        on_layer(0, f"KV for layer {msg.layer} broke off: {why}")

    return Landing([memoryview(buf.numpy())], state.lock, state.is_live, finish, abandon), None
