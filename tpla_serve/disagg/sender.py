"""Prefill side of the KV stream: one KVSender per prefill scheduler.

The engine calls send_layer() after each layer and send_done() after sampling the first token; both
return at once (a GPU's layer is copied into pinned staging without waiting). The IO thread cuts layers into
per-rank messages (sender_stream.py, routes.py) for the data plane (transport.py), whose lanes write them
zero-copy, each once its copy is complete, while the engine computes on; DONE follows the last layer on its
lane. Decode servers REGISTER on the bootstrap socket; layers ready before their room registers wait in a
bounded buffer.

With a draft model (speculative decoding on the decode side), its layers follow the target's on the same
stream, whole, to the decode ranks that keep a draft pool. A decode whose draft the prefill cannot serve
(no draft here, or a different one) still gets the target's KV; DONE tells it to prefill its draft itself.
Only authenticated REGISTERs and ABORTs act on rooms (admission.py); messages to a room carry its tag.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import zmq

from tpla_serve.disagg.admission import BootstrapGate, PeerLimits
from tpla_serve.disagg.auth import UNAUTHENTICATED_WARNING, ClusterAuth
from tpla_serve.disagg.bootstrap import check_room
from tpla_serve.disagg.events import RoomEvent, RoomFailed, TransportLoop
from tpla_serve.disagg.handshake import KVSpec, layout_mismatch
from tpla_serve.disagg.io_loop import SEND_ERRORS
from tpla_serve.disagg.log_limit import RateLimitedLog
from tpla_serve.disagg.messages import Abort, Done, PromptLogprobs, Register, TopLogprobs, encode
from tpla_serve.disagg.routes import OncePerPeer, plan_routes
from tpla_serve.disagg.sender_rooms import (
    AbortCmd,
    Command,
    DoneCmd,
    EndedRooms,
    LayerCmd,
    SendFailedCmd,
    SenderRoom,
    SenderStats,
    release,
)
from tpla_serve.disagg.sender_stream import BATCH_BYTES, RoomStreamer
from tpla_serve.disagg.staging import StagingPool, stage_device_layers
from tpla_serve.disagg.tcp_listen import TcpPlane
from tpla_serve.disagg.transport import DataPlane

logger = logging.getLogger(__name__)

_RECV_BATCH = 256
_SWEEP_EVERY_S = 5.0
_NONCES_PER_ROOM = 16  # REGISTERs remembered against replay, per room slot, within the allowed clock skew


class KVSender(TransportLoop):
    """Streams prompts' latent KV to the decode servers that register for them.

    Threading: every method may be called from any thread; all sockets live on the sender's IO thread.
    Tensors passed to send_layer are kept (not copied) until sent: do not modify them afterwards.

    secret: what every peer must prove (None: any peer is accepted, with a warning). max_peer_rooms,
    max_peer_endpoints: what one decode server may hold at once; max_sockets: outbound connections in all;
    max_register_skew_s: how far a REGISTER's issue time may be from this host's clock.
    data_plane: how bytes reach the decode ranks (TCP by default).
    """

    def __init__(
        self,
        kv: KVSpec,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        draft: KVSpec | None = None,
        timeout_s: float = 60.0,
        max_rooms: int = 1024,
        max_buffered_bytes_per_room: int = 1 << 30,
        max_buffered_bytes: int = 4 << 30,
        on_event: Callable[[RoomEvent], None] | None = None,
        secret: str | None = None,
        max_peer_rooms: int = 512,
        max_peer_endpoints: int = 64,
        max_sockets: int = 512,
        max_register_skew_s: float = 60.0,
        data_plane: DataPlane | None = None,
    ) -> None:
        super().__init__("kv-sender", on_event)
        auth = ClusterAuth(secret)
        limits = PeerLimits(max_peer_rooms, max_peer_endpoints)
        replay_capacity = _NONCES_PER_ROOM * max_rooms
        self._gate = BootstrapGate(self.ctx, host, port, auth, max_register_skew_s, replay_capacity, limits)
        self.bootstrap_port, self.bootstrap_endpoint = self._gate.port, self._gate.endpoint
        self.poller.register(self._gate.socket, zmq.POLLIN)
        self.kv = kv
        self.draft = draft
        self.timeout_s = timeout_s
        self.max_rooms = max_rooms
        self.max_buffered_bytes_per_room = max_buffered_bytes_per_room
        self.max_buffered_bytes = max_buffered_bytes
        self._data = (data_plane if data_plane is not None else TcpPlane()).sender(timeout_s, max_sockets)
        self._staging = StagingPool(pin=torch.cuda.is_available())
        self._streamer = RoomStreamer(kv, self._data, self._staging, self._send_failed)
        if not auth.authenticated:
            logger.warning(UNAUTHENTICATED_WARNING, f"the KV bootstrap socket {self.bootstrap_endpoint}")
        # Registered rooms' latent groups: written by the IO thread, read by send_layer.
        self._latent_groups: dict[int, int] = {}
        self._quiet_lock = threading.Lock()
        self._quiet_bytes = 0  # staged layers' bytes queued without waking the IO thread
        # IO-thread state
        self._rooms: dict[int, SenderRoom] = {}
        self._buffered_bytes = 0
        self._next_sweep = 0.0
        self._rooms_sent = self._rooms_failed = 0
        self._rooms_registered = 0
        self._draft_warnings = OncePerPeer()
        self._log = RateLimitedLog(logger)
        self._ended = EndedRooms(4 * max_rooms)  # recently ended rooms, for late commands
        self._start()

    # ------------------------------------------------------------ engine API

    def send_layer(
        self, room: int, layer: int, ckv: torch.Tensor, kpe: torch.Tensor, token_start: int = 0, *,
        draft: bool = False,
    ) -> None:
        """Stream tokens [token_start, token_start + n) of `layer`: ĉ [n, r] and k_pe [n, d_r].

        draft: the layer is the draft model's (a sender made with draft=). Each layer's token ranges must
        come in order without gaps (chunked prefill sends chunk after chunk). Nothing waits for device tensors:
        a registered room's are staged to pinned memory by the IO thread with the rest of their batch, cut by
        latent group on the device; a room not registered yet has them copied on the current stream now.
        A lane sends staged rows once their copy is complete."""
        check_room(room)
        spec = self.kv
        if draft:
            if self.draft is None:
                raise ValueError("draft=True, but this sender was made without a draft KVSpec")
            spec = self.draft
        spec.check_layer_rows(layer, token_start, ckv, kpe)
        wire_layer = layer + self.kv.num_layers if draft else layer
        if ckv.device.type == "cpu" and kpe.device.type == "cpu":
            self._submit(LayerCmd(room, wire_layer, token_start, ckv, kpe))
            return
        groups = self._latent_groups.get(room)
        if groups is not None:
            # Registered: the IO thread stages the layer with the rest of its batch (one gather and one
            # device→host copy per batch, off the engine's thread) once the engine's stream computed it.
            computed = torch.cuda.Event()
            computed.record(torch.cuda.current_stream(ckv.device))
            cmd = LayerCmd(room, wire_layer, token_start, ckv, kpe, computed, None, 1 if draft else groups)
        else:  # the decode's layout is not known yet: staged now, whole, to wait in pinned memory
            (host_ckv,), (host_kpe,), ready, holds = stage_device_layers(self._staging, [ckv], [kpe], 1)
            cmd = LayerCmd(room, wire_layer, token_start, host_ckv, host_kpe, ready, holds)
        # Staged layers wait to batch anyway (sender_stream.py): the IO thread need not wake for each.
        with self._quiet_lock:
            self._quiet_bytes += cmd.nbytes
            wake = self._quiet_bytes >= BATCH_BYTES
            if wake:
                self._quiet_bytes = 0
        self._submit(cmd, wake)

    def send_done(
        self,
        room: int,
        first_token_id: int,
        first_token_logprob: float | None = None,
        prompt_logprobs: PromptLogprobs | None = None,
        first_token_top: TopLogprobs | None = None,
    ) -> None:
        """Finish the room: every layer has been sent; the decode may start from first_token_id. The
        logprobs (the prompt's, the first token's top-k: what the decode's answer reports) go to rank 0."""
        check_room(room)
        if type(first_token_id) is not int or not 0 <= first_token_id < 1 << 31:
            raise ValueError(f"first_token_id must be a non-negative int32, got {first_token_id!r}")
        logprob = None if first_token_logprob is None else float(first_token_logprob)
        self._submit(DoneCmd(Done(room, first_token_id, logprob, prompt_logprobs, False, first_token_top)))

    def abort(self, room: int, message: str) -> None:
        """End the room from the prefill side; the decode ranks get ABORT with `message`."""
        check_room(room)
        self._submit(AbortCmd(room, str(message)))

    def stats(self) -> SenderStats:
        gate, out = self._gate, self._streamer
        return SenderStats(
            out.bytes_sent, out.draft_bytes_sent, self._rooms_sent, self._rooms_failed, len(self._rooms),
            self._rooms_registered, gate.rejected, gate.unauthenticated, self._data.connections(),
            self._staging.in_use,
        )

    # ------------------------------------------------------------ IO thread

    def _send_failed(self, room: int, error: str) -> None:
        """A lane could not send the room's message (called on the lane's thread)."""
        with contextlib.suppress(RuntimeError):  # the sender closed meanwhile
            self._submit(SendFailedCmd(room, error))

    def _on_command(self, cmd: Command) -> None:
        now = time.monotonic()
        if isinstance(cmd, SendFailedCmd):
            state = self._rooms.get(cmd.room)
            if state is not None:
                self._fail(state, f"cannot send to the decode server: {cmd.message}")
            return
        ended = self._ended.get(cmd.room)
        if ended is not None:
            message = ended.late(cmd)
            if message is not None:
                self._events.emit([RoomFailed(cmd.room, message)])
            return
        state = self._rooms.get(cmd.room)
        if state is None:
            if isinstance(cmd, AbortCmd):
                self._ended.end(cmd.room, cmd.message, reported=True)
                return
            if len(self._rooms) >= self.max_rooms:
                message = f"prefill has too many rooms in flight ({self.max_rooms})"
                release(cmd)
                self._rooms_failed += 1
                self._ended.end(cmd.room, message, reported=True)
                self._events.emit([RoomFailed(cmd.room, message)])
                return
            state = self._new_room(cmd.room, now)
        state.touched = True
        state.deadline = now + self.timeout_s
        if isinstance(cmd, AbortCmd):
            self._fail(state, cmd.message, report=False)
        elif state.registration is not None:
            self._stream(state, cmd, now)
        else:
            self._buffer(state, cmd)

    def _flush(self) -> None:
        """Layers batched in this round of commands (or of REGISTERs) go out now."""
        for room in self._streamer.rooms_to_flush():
            try:
                self._streamer.flush(room)
            except SEND_ERRORS as exc:
                state = self._rooms.get(room)
                if state is not None:
                    self._fail(state, f"cannot send to the decode server: {exc}")

    def _on_sockets(self, ready: dict[Any, int]) -> None:
        now = time.monotonic()
        if ready.get(self._gate.socket, 0) & zmq.POLLIN:
            for msg in self._gate.receive(_RECV_BATCH):  # authenticated: the rest was dropped unread
                if isinstance(msg, Abort):
                    self._on_decode_abort(msg)
                else:
                    self._on_register(msg, now)

    def _on_tick(self, now: float) -> None:
        for state in [s for s in self._rooms.values() if s.deadline < now]:
            if state.registration is None:
                self._fail(
                    state, f"timed out after {self.timeout_s:g}s waiting for the decode server to register"
                )
            else:
                self._fail(state, f"timed out after {self.timeout_s:g}s waiting for the prefill to finish")
        if now >= self._next_sweep:
            self._next_sweep = now + _SWEEP_EVERY_S
            live = {e for s in self._rooms.values() if s.registration for e in s.registration.rank_endpoints}
            self._data.sweep(self.timeout_s, live)

    def _on_close(self) -> None:
        self._data.close()
        self._gate.socket.close()

    def _on_decode_abort(self, msg: Abort) -> None:
        message = f"decode server aborted the room: {msg.message}"
        state = self._rooms.get(msg.room)
        if state is not None:
            # Tell every decode rank, so ranks that did not fail end the room now rather than by timeout.
            self._fail(state, message)
        elif msg.room not in self._ended:
            self._ended.end(msg.room, message, reported=False)

    def _on_register(self, reg: Register, now: float) -> None:
        """An authenticated REGISTER: bind its room to the decode's endpoints, unless the room cannot be
        served or the decode server holds all it may (then only its notify endpoint hears why)."""
        state = self._rooms.get(reg.room)
        problem = self._gate.peers.endpoint_refusal(reg, self._data)
        if problem is not None:
            self._refuse(reg, state, problem, now, notify_only=True)
            return
        ended = self._ended.get(reg.room)
        if ended is not None:
            why = "it completed" if ended.message is None else ended.message
            self._send_abort(reg, f"room {reg.room} already ended on the prefill server: {why}", now)
            return
        if state is not None and state.registration is not None:
            self._fail(state, f"room {reg.room} registered twice")
            self._send_abort(reg, f"room {reg.room} registered twice", now)
            return
        problem = layout_mismatch(self.kv, reg.layout) or self._gate.peers.room_refusal(reg)
        if problem is None and len(self._rooms) >= self.max_rooms and state is None:
            problem = f"prefill has too many rooms in flight ({self.max_rooms})"
        if problem is not None:
            self._refuse(reg, state, problem, now, notify_only=False)
            return
        if state is None:
            state = self._new_room(reg.room, now)
        state.registration = reg
        self._gate.peers.add(reg)
        self._rooms_registered += 1
        key = self._gate.auth.room_keys(reg.room).to_decode
        state.routes, draft_problem = plan_routes(reg, self.kv, self.draft, key)
        self._latent_groups[reg.room] = reg.layout.latent_groups
        if draft_problem is not None:
            self._draft_warnings.warn(reg.notify_endpoint, draft_problem)
        state.deadline = now + self.timeout_s
        buffered, state.buffered = state.buffered, []
        self._buffered_bytes -= state.buffered_bytes
        state.buffered_bytes = 0
        for cmd in buffered:
            if self._rooms.get(reg.room) is not state:  # a buffered command ended the room
                release(cmd)
                continue
            self._stream(state, cmd, now)

    def _refuse(
        self, reg: Register, state: SenderRoom | None, problem: str, now: float, notify_only: bool
    ) -> None:
        """End the room a REGISTER names without serving it, and tell the decode server why."""
        self._log.warning("refused", "room %d: %s", reg.room, problem)
        if state is not None:
            self._fail(state, problem, tell_decode=state.registration is not None)
        elif reg.room not in self._ended:
            self._ended.end(reg.room, problem, reported=False)
        self._send_abort(reg, problem, now, notify_only)

    def _new_room(self, room: int, now: float) -> SenderRoom:
        num_layers = self.kv.num_layers + (self.draft.num_layers if self.draft is not None else 0)
        state = SenderRoom(room=room, deadline=now + self.timeout_s, next_start=[0] * num_layers)
        self._rooms[room] = state
        return state

    def _buffer(self, state: SenderRoom, cmd: Command) -> None:
        problem = state.buffer(cmd, self._buffered_bytes, self.max_buffered_bytes_per_room, self.max_buffered_bytes)
        if problem is not None:
            release(cmd)
            self._fail(state, problem)
        elif isinstance(cmd, LayerCmd):
            self._buffered_bytes += cmd.nbytes

    def _stream(self, state: SenderRoom, cmd: Command, now: float) -> None:
        problem = None
        try:
            if isinstance(cmd, LayerCmd):
                problem = self._streamer.layer(state, cmd)
            elif isinstance(cmd, DoneCmd):
                problem = self._streamer.done(state, cmd.done)
        except SEND_ERRORS as exc:
            problem = f"cannot send to the decode server: {exc}"
        if problem is not None:
            self._fail(state, problem)
        elif isinstance(cmd, DoneCmd):
            self._rooms_sent += 1
            self._remove(state)
            self._ended.end(state.room, None, reported=True)

    def _fail(self, state: SenderRoom, message: str, tell_decode: bool = True, report: bool = True) -> None:
        """End a live room: drop what is still queued, tell the decode ranks and, once the engine has
        sent anything for the room (and did not end it itself), the engine."""
        self._remove(state)
        self._streamer.drop(state.room)
        self._data.drop_room(state.room)
        if tell_decode and state.registration is not None:
            self._send_abort(state.registration, message, time.monotonic())
        self._rooms_failed += 1
        report = report and state.touched
        self._ended.end(state.room, message, reported=report or state.touched)
        if report:
            self._events.emit([RoomFailed(state.room, message)])

    def _send_abort(self, reg: Register, message: str, now: float, notify_only: bool = False) -> None:
        frames = encode(Abort(reg.room, message), self._gate.auth.room_keys(reg.room).to_decode)
        endpoints = (reg.notify_endpoint,) if notify_only else (*reg.rank_endpoints, reg.notify_endpoint)
        for endpoint in dict.fromkeys(endpoints):
            try:
                self._data.send(endpoint, 0, reg.room, frames, lambda error: None)
            except SEND_ERRORS as exc:
                self._log.warning("abort", "room %d: cannot send ABORT to %s: %s", reg.room, endpoint, exc)

    def _remove(self, state: SenderRoom) -> None:
        del self._rooms[state.room]
        self._latent_groups.pop(state.room, None)
        if state.registration is not None:
            self._rooms_registered -= 1
            self._gate.peers.remove(state.registration)
        self._buffered_bytes -= state.buffered_bytes
        for cmd in state.buffered:
            release(cmd)
        state.buffered, state.buffered_bytes = [], 0
