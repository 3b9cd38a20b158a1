"""How a registered prefill room's layers and DONE go out: sliced per decode rank along its routes
(routes.py), each message handed to the data plane on its layer's lane with what it must give back
when done (staging buffers) and who hears when it could not be sent.

Small layers of one room leave as one message per rank when they are consecutive and of the same tokens:
host layers the engine handed over together (queued while the IO thread was busy: a short prompt computes
faster than its KV moves), so a host layer that comes alone leaves at once; and a GPU's layers until
BATCH_BYTES, DONE or a layer that does not join: each message costs a decode rank on a GPU a host → device
copy and an event, several times what a host rank pays per message, and a GPU's bytes cannot leave before
their copy to pinned memory is complete anyway. A registered room's GPU layers reach this thread still on
the device and are staged here, a batch at a time: one gather and one device → host copy for the batch, on
this thread's copy stream, instead of two copies per layer on the engine's thread."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from tpla_serve.disagg.handshake import KVSpec
from tpla_serve.disagg.messages import MAX_BATCH_LAYERS, Done, encode
from tpla_serve.disagg.routes import draft_layer_messages, target_layer_messages
from tpla_serve.disagg.sender_rooms import LayerCmd, SenderRoom
from tpla_serve.disagg.staging import Holds, StagingPool, stage_device_layers
from tpla_serve.disagg.transport import DataSender, SendDone

BATCH_BYTES = 4 << 20  # a message per rank stops taking more layers at this size (fewer messages: less CPU)


@dataclasses.dataclass
class _Batch:
    """A room's layers waiting to leave as one message per rank on one lane (its first layer's), and their
    bytes (an upper bound of what each rank gets)."""

    state: SenderRoom
    lane: int
    cmds: list[LayerCmd] = dataclasses.field(default_factory=list)
    nbytes: int = 0

    def add(self, cmd: LayerCmd) -> None:
        self.cmds.append(cmd)
        self.nbytes += cmd.nbytes

    @property
    def staged(self) -> bool:
        """Its layers are a GPU's, in pinned staging: they wait for more."""
        return self.cmds[0].staged


class RoomStreamer:
    """Streams registered rooms (the sender's IO thread). Each method returns why the room must fail,
    or None; a send the plane refuses at once raises (SEND_ERRORS), one that fails later reaches
    on_failed(room, why) on the plane's thread."""

    def __init__(
        self, kv: KVSpec, data: DataSender, staging: StagingPool, on_failed: Callable[[int, str], None]
    ) -> None:
        self.kv = kv
        self.data = data
        self.staging = staging
        self.on_failed = on_failed
        self.bytes_sent = 0  # draft included
        self.draft_bytes_sent = 0
        self._batches: dict[int, _Batch] = {}  # room -> layers not sent yet
        self._copy_streams: dict[torch.device, torch.cuda.Stream] = {}  # this thread's, for staging

    def layer(self, state: SenderRoom, cmd: LayerCmd) -> str | None:
        """Take the layer (and its hold on any staging) into the room's batch, or send it."""
        reg, routes = state.registration, state.routes
        assert reg is not None and routes is not None
        draft = cmd.layer >= self.kv.num_layers
        if draft and not routes.send_draft:
            cmd.release()
            return None  # the decode does not want this draft's KV
        problem = state.take_layer(cmd, reg.n_tokens)
        if problem is not None:
            cmd.release()
            return problem
        batch = self._batches.get(state.room)
        if batch is not None and not self._joins(batch, cmd, routes.chunk_tokens):
            self.flush(state.room)
            batch = None
        if batch is None:
            batch = self._batches[state.room] = _Batch(state, state.lane(cmd.layer))
        batch.add(cmd)
        if batch.nbytes >= BATCH_BYTES:
            self.flush(state.room)
        return None

    def _joins(self, batch: _Batch, cmd: LayerCmd, chunk_tokens: int) -> bool:
        last, n = batch.cmds[-1], cmd.n_tokens
        draft = cmd.layer >= self.kv.num_layers
        lane = batch.state.layer_lanes.get(cmd.layer, batch.lane)
        return (
            cmd.layer == last.layer + 1 and cmd.token_start == last.token_start and n == last.n_tokens
            and cmd.latent_groups == last.latent_groups and cmd.staged == last.staged
            and cmd.on_device == last.on_device
            and (last.layer >= self.kv.num_layers) == draft and (draft or n <= chunk_tokens)
            and len(batch.cmds) < MAX_BATCH_LAYERS
            and lane == batch.lane
        )

    def flush(self, room: int) -> None:
        """Send the room's batched layers (raises SEND_ERRORS like the data plane's send)."""
        batch = self._batches.pop(room, None)
        if batch is None:
            return
        state, cmds = batch.state, batch.cmds
        routes = state.routes
        assert routes is not None
        draft = cmds[0].layer >= self.kv.num_layers
        if draft and len(cmds) > 1 and cmds[0].n_tokens > routes.draft_chunk_tokens:
            for cmd in cmds:  # draft layers batch only within one chunk
                self._batches[room] = _Batch(state, state.lane(cmd.layer))
                self._batches[room].add(cmd)
                self.flush(room)
            return
        if cmds[0].on_device:
            cmds = self._stage(cmds)
        messages = draft_layer_messages if draft else target_layer_messages
        lane = batch.lane
        for cmd in cmds:
            state.layer_lanes[cmd.layer] = lane
        try:
            for endpoint, frames, nbytes, holds, fill in messages(routes, room, cmds, self.staging):
                self.data.send(endpoint, lane, room, frames, self._sent(room, holds), fill)
                self.bytes_sent += nbytes
                if draft:
                    self.draft_bytes_sent += nbytes
        finally:
            for cmd in cmds:
                cmd.release()

    def _stage(self, cmds: list[LayerCmd]) -> list[LayerCmd]:
        """Device layers into pinned staging, the batch at once; each copy waits for its layer's compute."""
        device = cmds[0].ckv.device
        stream = self._copy_streams.get(device)
        if stream is None:
            stream = self._copy_streams[device] = torch.cuda.Stream(device)
        ckvs, kpes, ready, holds = stage_device_layers(
            self.staging, [c.ckv for c in cmds], [c.kpe for c in cmds], cmds[0].latent_groups, stream,
            tuple(c.ready for c in cmds),
        )
        staged = [dataclasses.replace(c, ckv=ckv, kpe=kpe, ready=ready, holds=holds.hold())
                  for c, ckv, kpe in zip(cmds, ckvs, kpes)]
        holds.drop()  # each layer holds the buffer now
        return staged

    def rooms_to_flush(self) -> list[int]:
        """Rooms whose batched layers go at the end of the IO thread's round (staged ones wait for more)."""
        return [room for room, batch in self._batches.items() if not batch.staged]

    def drop(self, room: int) -> None:
        """Forget the room's batched layers (it ended)."""
        batch = self._batches.pop(room, None)
        for cmd in batch.cmds if batch is not None else ():
            cmd.release()

    def done(self, state: SenderRoom, done: Done) -> str | None:
        """DONE to every rank, behind the last layer on its lane (one write when that one still waits)."""
        self.flush(state.room)
        reg, routes = state.registration, state.routes
        assert reg is not None and routes is not None
        send_draft = routes.send_draft
        wire_layers = len(state.next_start) if send_draft else self.kv.num_layers
        problem = state.unfinished_layer(wire_layers, reg.n_tokens)
        if problem is not None:
            return problem
        lane = state.lane(wire_layers - 1)
        for rank, endpoint in enumerate(reg.rank_endpoints):
            msg = dataclasses.replace(
                done,
                prompt_logprobs=done.prompt_logprobs if rank == 0 else None,
                first_token_top=done.first_token_top if rank == 0 else None,
                draft_kv=send_draft and reg.layout.wants_draft(rank),
            )
            self.data.send(endpoint, lane, state.room, encode(msg, routes.key), self._sent(state.room))
        return None

    def _sent(self, room: int, holds: tuple[Holds, ...] = ()) -> SendDone:
        """A message's on_done: give back its staging buffers; a failed send fails the room."""

        def on_done(error: str | None) -> None:
            for h in holds:
                h.drop()
            if error is not None:
                self.on_failed(room, error)

        return on_done
