"""Decode side of the KV stream: one KVReceiver per decode rank.

Every rank binds a PULL endpoint and is told which rooms to expect; decode rank 0 also REGISTERs each
room with the prefill's bootstrap socket. Each incoming layer chunk is checked against the expectation
before the engine's writer copies it into the rank's KV pages; a room ends exactly once, as
RoomCompleted (every layer, then DONE) or RoomFailed (with the reason), and is then forgotten.

A rank that keeps a draft pool (layout.draft_ranks) also accepts the draft's layers, numbered after the
target's; DONE says whether they were sent (a prefill without that draft sends the target's alone).
A message counts only when it carries its room's prefill → decode tag (auth.py); others are dropped unread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from tpla_serve.disagg.auth import UNAUTHENTICATED_WARNING, ClusterAuth, register_stamp, signed_by
from tpla_serve.disagg.bootstrap import bootstrap_endpoint, check_room, tcp_endpoint
from tpla_serve.disagg.events import RoomCompleted, RoomEvent, RoomFailed, TransportLoop
from tpla_serve.disagg.handshake import DecodeLayout
from tpla_serve.disagg.io_loop import SEND_ERRORS, Outbound, bind_tcp, peer_address
from tpla_serve.disagg.log_limit import RateLimitedLog
from tpla_serve.disagg.messages import (
    MAX_HEADER_BYTES,
    MAX_TOKENS,
    Abort,
    Done,
    Frame,
    LayerKV,
    ProtocolError,
    Register,
    decode,
    encode,
)
from tpla_serve.disagg.receiver_rooms import ExpectedRoom, KVWriter

logger = logging.getLogger(__name__)

_RECV_BATCH = 64
_SWEEP_EVERY_S = 5.0
_NO_KV_HINT = "; none at all: is --disaggregation-secret the same on both servers?"


@dataclass(frozen=True)
class _SendCmd:
    endpoint: str
    room: int
    frames: list[Frame]


@dataclass(frozen=True)
class ReceiverStats:
    bytes_received: int  # draft included
    draft_bytes_received: int
    rooms_completed: int
    rooms_failed: int
    rooms_live: int
    messages_rejected: int  # malformed or inconsistent messages
    messages_dropped: int  # well-formed messages for rooms this rank does not (or no longer) expect
    messages_unauthenticated: int  # for an expected room, without its tag: dropped unread


class KVReceiver(TransportLoop):
    """Receives one decode rank's slice of prompts' latent KV.

    Threading: methods may be called from any thread. The writer and the on_event callback run on the
    receiver's IO thread; the writer only ever touches the pages of its own room, and is never called
    for a room again once expect()'s room has ended or cancel() has returned.

    secret: what the prefill must prove (None: any peer is accepted, with a warning on rank 0).
    max_sockets: connections to prefill servers open at once.
    """

    def __init__(
        self,
        layout: DecodeLayout,
        rank: int,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        advertise_host: str | None = None,
        timeout_s: float = 60.0,
        default_bootstrap_port: int | None = None,
        max_rooms: int = 4096,
        max_frame_bytes: int = 64 << 20,
        on_event: Callable[[RoomEvent], None] | None = None,
        secret: str | None = None,
        max_sockets: int = 256,
    ) -> None:
        layout.rank_layout(rank)  # validates rank
        if advertise_host is None and host in ("0.0.0.0", "::", "*"):
            raise ValueError("advertise_host is required when binding a wildcard address")
        super().__init__(f"kv-receiver-{rank}", on_event)
        self.layout = layout
        self.rank = rank
        self.timeout_s = timeout_s
        self.default_bootstrap_port = default_bootstrap_port
        self.max_rooms = max_rooms
        self.max_frame_bytes = max_frame_bytes
        self._auth = ClusterAuth(secret)
        self._log = RateLimitedLog(logger)
        self._pull = self.ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.setsockopt(zmq.MAXMSGSIZE, max(max_frame_bytes, MAX_HEADER_BYTES))
        self._pull.setsockopt(zmq.RCVHWM, 16)
        self.endpoint = tcp_endpoint(advertise_host or host, bind_tcp(self._pull, host, port))
        self.poller.register(self._pull, zmq.POLLIN)
        self._out = Outbound(self.ctx, self.poller, max_sockets)
        self._lock = threading.Lock()
        self._rooms: dict[int, ExpectedRoom] = {}
        self._next_sweep = 0.0
        self._bytes = self._draft_bytes = self._completed = self._failed = self._rejected = self._dropped = 0
        self._unauthenticated = 0
        if rank == 0 and not self._auth.authenticated:
            logger.warning(UNAUTHENTICATED_WARNING, f"the decode KV receiver {self.endpoint}")
        self._start()

    # ------------------------------------------------------------ engine API

    def expect(
        self, room: int, n_tokens: int, writer: KVWriter, bootstrap_host: str, bootstrap_port: int | None
    ) -> None:
        """Accept the room's KV from now on (every rank, before rank 0's send_register). A null
        bootstrap_port means this server's default_bootstrap_port."""
        check_room(room)
        if type(n_tokens) is not int or not 1 <= n_tokens <= MAX_TOKENS:
            raise ValueError(f"n_tokens must be an int in [1, {MAX_TOKENS}], got {n_tokens!r}")
        if not callable(writer):
            raise TypeError("writer must be callable")
        bootstrap = bootstrap_endpoint(bootstrap_host, bootstrap_port, self.default_bootstrap_port)
        state = ExpectedRoom(
            room=room,
            n_tokens=n_tokens,
            writer=writer,
            bootstrap=bootstrap,
            keys=self._auth.room_keys(room),
            deadline=time.monotonic() + self.timeout_s,
            next_start=[0] * self.layout.num_wire_layers(self.rank),
        )
        with self._lock:
            if room in self._rooms:
                raise ValueError(f"bootstrap_room {room} is already expected on rank {self.rank}")
            if len(self._rooms) >= self.max_rooms:
                raise ValueError(
                    f"decode rank {self.rank} already expects {self.max_rooms} rooms, the most it takes "
                    "at once"
                )
            self._rooms[room] = state

    def send_register(
        self, room: int, rank_endpoints: Sequence[str], notify_endpoint: str | None = None
    ) -> None:
        """REGISTER an expected room with its prefill (decode rank 0, once every rank expects it)."""
        issued_ms, nonce = register_stamp()
        with self._lock:
            state = self._rooms.get(room)
            if state is None:
                raise ValueError(f"bootstrap_room {room} is not expected on rank {self.rank}")
            reg = Register(
                room=room,
                layout=self.layout,
                rank_endpoints=tuple(rank_endpoints),
                notify_endpoint=notify_endpoint or self.endpoint,
                n_tokens=state.n_tokens,
                max_frame_bytes=self.max_frame_bytes,
                issued_ms=issued_ms,
                nonce=nonce,
            )
            bootstrap = state.bootstrap
        self._submit(_SendCmd(bootstrap, room, encode(reg, self._auth.register_key)))

    def cancel(self, room: int, message: str = "request aborted by the client") -> bool:
        """End the room now (no event follows) and tell its prefill. True if the room was live."""
        with self._lock:  # waits for a writer call in progress on this room
            state = self._rooms.pop(room, None)
        if state is None:
            return False
        self._submit(_SendCmd(state.bootstrap, room, encode(Abort(room, message), state.keys.to_prefill)))
        return True

    def stats(self) -> ReceiverStats:
        return ReceiverStats(
            self._bytes,
            self._draft_bytes,
            self._completed,
            self._failed,
            len(self._rooms),
            self._rejected,
            self._dropped,
            self._unauthenticated,
        )

    # ------------------------------------------------------------ IO thread

    def _on_command(self, cmd: _SendCmd) -> None:
        try:
            self._out.send(cmd.endpoint, cmd.room, cmd.frames, time.monotonic())
        except SEND_ERRORS as exc:
            self._fail_room(cmd.room, f"cannot reach the prefill server at {cmd.endpoint}: {exc}", tell=False)

    def _on_sockets(self, ready: dict[Any, int]) -> None:
        now = time.monotonic()
        if ready.get(self._pull, 0) & zmq.POLLIN:
            for _ in range(_RECV_BATCH):
                try:
                    frames = self._pull.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._on_message(frames, now)
        self._out.on_writable(ready, now)

    def _on_tick(self, now: float) -> None:
        with self._lock:
            expired = [s for s in self._rooms.values() if s.deadline < now]
        for s in expired:
            layers = sum(1 for n in s.next_start if n == s.n_tokens)
            hint = "" if s.first_data is not None else _NO_KV_HINT
            self._fail_room(
                s.room,
                f"timed out: no KV from the prefill server at {s.bootstrap} for {self.timeout_s:g}s "
                f"(rank {self.rank} has {layers} of {len(s.next_start)} layers{hint})",
                tell=True,
            )
        self._out.expire(now, self.timeout_s)
        if now >= self._next_sweep:
            self._next_sweep = now + _SWEEP_EVERY_S
            with self._lock:
                live = {s.bootstrap for s in self._rooms.values()}
            self._out.sweep(now, self.timeout_s, live)

    def _on_close(self) -> None:
        self._out.close()
        self._pull.close()

    def _on_message(self, frames: list[zmq.Frame], now: float) -> None:
        try:
            msg = decode(frames)
            if isinstance(msg, Register):
                raise ProtocolError("REGISTER sent to a decode rank")
        except ProtocolError as exc:
            self._rejected += 1
            self._log.warning(
                "malformed", "rank %d rejected a message from %s: %s", self.rank, peer_address(frames), exc
            )
            return
        events: list[RoomEvent] = []
        with self._lock:
            state = self._rooms.get(msg.room)
            if state is None:
                self._dropped += 1
                logger.debug(
                    "rank %d dropped %s for room %d, which it does not expect",
                    self.rank,
                    type(msg).__name__,
                    msg.room,
                )
                return
            if not signed_by(state.keys.to_decode, frames):
                self._unauthenticated += 1
                self._log.warning(
                    "unauthenticated", "rank %d dropped %s for room %d from %s: its tag is not the room's",
                    self.rank, type(msg).__name__, msg.room, peer_address(frames),
                )
                return
            if isinstance(msg, LayerKV):
                problem = self._on_layer(state, msg, now)
            elif isinstance(msg, Done):
                problem = self._on_done(state, msg, now, events)
            else:
                problem = None
                del self._rooms[state.room]
                self._failed += 1
                events.append(RoomFailed(state.room, f"prefill server aborted the room: {msg.message}"))
            if problem is not None:
                del self._rooms[state.room]
                self._failed += 1
                events.append(RoomFailed(state.room, problem))
                self._send_abort(state, problem, now)
        self._events.emit(events)

    def _on_layer(self, state: ExpectedRoom, msg: LayerKV, now: float) -> str | None:
        """Validate and write one chunk (lock held); a message saying why the room fails, or None."""
        problem = state.layer_problem(msg, self.layout.kv.num_layers, self.rank)
        if problem is not None:
            self._rejected += 1
            return problem
        draft = msg.layer >= self.layout.kv.num_layers
        if draft:
            assert self.layout.draft is not None  # num_wire_layers counts draft layers only with a draft
            spec, ckv_width = self.layout.draft, self.layout.draft.kv_lora_rank
        else:
            spec, ckv_width = self.layout.kv, self.layout.ckv_width
        try:
            ckv, kpe = msg.tensors(spec.torch_dtype, ckv_width, spec.rope_dim)
        except ProtocolError as exc:
            self._rejected += 1
            return f"bad KV frame for layer {msg.layer}: {exc}"
        try:
            state.writer(msg.layer, msg.token_start, ckv, kpe)
        except Exception as exc:  # the engine's writer failing ends this room, not the receiver
            logger.exception("rank %d: writer failed for room %d", self.rank, state.room)
            return f"writing KV on rank {self.rank} failed: {exc}"
        if state.first_data is None:
            state.first_data = now
        state.next_start[msg.layer] = msg.token_start + msg.n_tokens
        nbytes = ckv.nbytes + kpe.nbytes
        state.nbytes += nbytes
        self._bytes += nbytes
        if draft:
            state.draft_nbytes += nbytes
            self._draft_bytes += nbytes
        state.deadline = now + self.timeout_s
        return None

    def _on_done(self, state: ExpectedRoom, msg: Done, now: float, events: list[RoomEvent]) -> str | None:
        problem = state.done_problem(msg, self.layout.kv.num_layers, self.rank)
        if problem is not None:
            self._rejected += 1
            return problem
        del self._rooms[state.room]
        self._completed += 1
        seconds = 0.0 if state.first_data is None else now - state.first_data
        events.append(
            RoomCompleted(
                room=state.room,
                first_token_id=msg.first_token_id,
                first_token_logprob=msg.first_token_logprob,
                prompt_logprobs=msg.prompt_logprobs,
                nbytes=state.nbytes,
                seconds=seconds,
                draft_kv=msg.draft_kv,
                draft_nbytes=state.draft_nbytes,
                first_token_top=msg.first_token_top,
            )
        )
        return None

    def _fail_room(self, room: int, message: str, tell: bool) -> None:
        with self._lock:
            state = self._rooms.pop(room, None)
        if state is None:
            return
        self._failed += 1
        if tell:
            self._send_abort(state, message, time.monotonic())
        self._events.emit([RoomFailed(room, message)])

    def _send_abort(self, state: ExpectedRoom, message: str, now: float) -> None:
        frames = encode(Abort(state.room, message), state.keys.to_prefill)
        try:
            self._out.send(state.bootstrap, state.room, frames, now)
        except SEND_ERRORS as exc:
            self._log.warning(
                "abort", "room %d: cannot send ABORT to %s: %s", state.room, state.bootstrap, exc
            )
