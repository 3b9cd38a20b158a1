"""A prefill room's life on the sender's IO thread: the engine's commands for it, buffered until the
decode server registers, then streamed along the room's routes; and what is remembered once it ends."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from tpla_serve.disagg.messages import Done, Register
from tpla_serve.disagg.routes import Routes
from tpla_serve.disagg.staging import Holds


@dataclass(frozen=True)
class LayerCmd:
    room: int
    layer: int  # wire numbering: the draft's layers follow the target's
    token_start: int
    # Host memory: the engine's own tensors, or pinned staging (`holds`) for a GPU's; or a GPU's own tensors,
    # which a registered room's batch stages on the IO thread (on_device).
    ckv: torch.Tensor
    kpe: torch.Tensor
    ready: Any = None  # a CUDA event: the copy into staging is complete (on_device: the rows are computed)
    holds: Holds | None = None
    latent_groups: int = 1  # > 1: ckv holds the decode's latent groups one after another, [g, n, r/g]

    @cached_property
    def n_tokens(self) -> int:
        return self.kpe.shape[0]

    @cached_property
    def nbytes(self) -> int:
        return self.ckv.nbytes + self.kpe.nbytes

    @cached_property
    def row_bytes(self) -> tuple[np.ndarray, np.ndarray]:
        """ĉ and k_pe as [n, row bytes] uint8 arrays over the same memory (ĉ [g, n, row bytes] when staged
        by latent group): rows and latent slices of them are numpy views, far cheaper to take per message
        than tensor slices."""
        ckv, kpe = (t.contiguous().view(torch.uint8).numpy() for t in (self.ckv, self.kpe))
        return ckv, kpe

    @property
    def staged(self) -> bool:
        """Its rows are a GPU's: copied into pinned staging (`ready` says when), or still on the device."""
        return self.ready is not None

    @property
    def on_device(self) -> bool:
        """Its rows are still in device memory: they are staged with their batch before they go out."""
        return self.ckv.device.type != "cpu"

    def release(self) -> None:
        """The command is done with (its messages hold what they still read)."""
        if self.holds is not None:
            self.holds.drop()


@dataclass(frozen=True)
class DoneCmd:
    done: Done

    @property
    def room(self) -> int:
        return self.done.room


@dataclass(frozen=True)
class AbortCmd:
    room: int
    message: str


@dataclass(frozen=True)
class SendFailedCmd:
    room: int
    message: str


Command = LayerCmd | DoneCmd | AbortCmd | SendFailedCmd


def release(cmd: Command) -> None:
    """Give back what a command holds (a layer's staging) when it will not be streamed."""
    if isinstance(cmd, LayerCmd):
        cmd.release()


@dataclass
class SenderRoom:
    room: int
    deadline: float
    next_start: list[int]  # per wire layer: tokens handed to the stream so far
    registration: Register | None = None
    routes: Routes | None = None  # set on registration
    buffered: list[Command] = field(default_factory=list)
    buffered_bytes: int = 0
    touched: bool = False  # the engine has sent commands for it, so it wants to hear how it ends
    # Wire layer -> the lane its first message took. A layer's messages must share a connection to arrive
    # in order; a batch of layers goes on its first layer's lane, so a batched layer may leave l % lanes.
    layer_lanes: dict[int, int] = field(default_factory=dict)

    def lane(self, layer: int) -> int:
        """The lane the layer's next message goes on."""
        assert self.routes is not None
        return self.layer_lanes.get(layer, layer % self.routes.lanes)

    def take_layer(self, cmd: LayerCmd, n_tokens: int) -> str | None:
        """Count a layer's rows as streamed, or say why they end the room (out of order, past the prompt)."""
        n = cmd.n_tokens
        expected = self.next_start[cmd.layer]
        if cmd.token_start != expected:
            return f"layer {cmd.layer}: tokens from {cmd.token_start} sent, expected {expected}"
        if cmd.token_start + n > n_tokens:
            return (
                f"prefill has at least {cmd.token_start + n} prompt tokens but the decode server expects "
                f"{n_tokens}"
            )
        self.next_start[cmd.layer] += n
        return None

    def unfinished_layer(self, wire_layers: int, n_tokens: int) -> str | None:
        """Why DONE may not close the room yet (a layer of the first `wire_layers` is short), or None."""
        for layer, sent in enumerate(self.next_start[:wire_layers]):
            if sent != n_tokens:
                return (
                    f"prefill finished with {sent} tokens of layer {layer}, the decode server expects "
                    f"{n_tokens}"
                )
        return None

    def buffer(self, cmd: Command, total_buffered: int, room_limit: int, total_limit: int) -> str | None:
        """Keep `cmd` until the decode registers; or why not, when it would pass a byte limit."""
        nbytes = cmd.nbytes if isinstance(cmd, LayerCmd) else 0
        if self.buffered_bytes + nbytes > room_limit:
            return f"more than {room_limit} bytes of KV were ready before the decode server registered the room"
        if total_buffered + nbytes > total_limit:
            return f"prefill's KV buffer for unregistered rooms is full ({total_limit} bytes)"
        self.buffered.append(cmd)
        self.buffered_bytes += nbytes
        return None


@dataclass
class EndedRoom:
    message: str | None  # None: completed
    reported: bool  # a RoomFailed went (or need not go) to the engine

    def late(self, cmd: Command) -> str | None:
        """A command for the ended room: the failure the engine has yet to hear (once), or None."""
        release(cmd)
        if isinstance(cmd, AbortCmd):  # the engine ended the room itself: nothing to tell it
            self.reported = True
        if self.reported or self.message is None:
            return None
        self.reported = True
        return self.message


class EndedRooms:
    """Rooms ended lately, for the commands and REGISTERs that still name them; the oldest are forgotten
    past `capacity`."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._rooms: OrderedDict[int, EndedRoom] = OrderedDict()

    def get(self, room: int) -> EndedRoom | None:
        return self._rooms.get(room)

    def __contains__(self, room: int) -> bool:
        return room in self._rooms

    def end(self, room: int, message: str | None, reported: bool) -> None:
        self._rooms[room] = EndedRoom(message, reported)
        self._rooms.move_to_end(room)
        while len(self._rooms) > self.capacity:
            self._rooms.popitem(last=False)


@dataclass(frozen=True)
class SenderStats:
    bytes_sent: int  # draft included
    draft_bytes_sent: int
    rooms_sent: int
    rooms_failed: int
    rooms_live: int
    rooms_registered: int  # live rooms whose decode server has registered
    messages_rejected: int  # malformed
    messages_unauthenticated: int  # a wrong tag, a stale or replayed REGISTER: dropped unread
    sockets_open: int  # outbound connections to decode servers
    staging_bytes: int = 0  # staging buffers held by layers not yet sent (0 once every room ended)
