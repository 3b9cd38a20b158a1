"""Decode side of the KV stream: one KVReceiver per decode rank.

Every rank listens on a data-plane endpoint (transport.py; TCP unless told otherwise) and is told which
rooms to expect; decode rank 0 also REGISTERs each room with the prefill's bootstrap socket. The header of
each incoming message is checked (its room's tag, the layer and token range it must be) before its payload
is read, straight into the room's KV pages where they are host memory, else into a reusable staging
buffer from which the room's writer copies it; a room ends exactly once, as RoomCompleted (every layer,
then DONE) or RoomFailed (with the reason), and is then forgotten.

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

from tpla_serve.disagg.auth import UNAUTHENTICATED_WARNING, ClusterAuth, register_stamp, signed_by
from tpla_serve.disagg.bootstrap import bootstrap_endpoint, check_room
from tpla_serve.disagg.events import RoomCompleted, RoomEvent, RoomFailed, TransportLoop
from tpla_serve.disagg.handshake import DecodeLayout
from tpla_serve.disagg.io_loop import SEND_ERRORS, Outbound
from tpla_serve.disagg.log_limit import RateLimitedLog
from tpla_serve.disagg.messages import (
    MAX_LANES,
    MAX_TOKENS,
    Abort,
    Done,
    Frame,
    LayerKV,
    ProtocolError,
    Register,
    Tag,
    decode,
    encode,
    peek,
)
from tpla_serve.disagg.receiver_rooms import ExpectedRoom, KVWriter, layer_landing
from tpla_serve.disagg.staging import StagingPool
from tpla_serve.disagg.tcp_listen import TcpPlane
from tpla_serve.disagg.transport import DataPlane, Landing

logger = logging.getLogger(__name__)

_SWEEP_EVERY_S = 5.0
_NO_KV_HINT = "; none at all: is --disaggregation-secret the same on both servers?"
_CONTROL_FRAMES = {Tag.DONE: 5, Tag.ABORT: 0}  # the most payload frames each may carry


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
    messages_rejected: int  # malformed or inconsistent messages, envelopes past a limit
    messages_dropped: int  # well-formed messages for rooms this rank does not (or no longer) expect
    messages_unauthenticated: int  # for an expected room, without its tag: dropped unread
    staging_bytes: int = 0  # staging buffers in use (0 whenever no chunk is being received)
    connections: int = 0  # prefill connections open on the data plane


class KVReceiver(TransportLoop):
    """Receives one decode rank's slice of prompts' latent KV.

    Threading: methods may be called from any thread. The writer and the on_event callback run on the
    transport's threads; the writer only ever touches the pages of its own room, and is never called
    for a room again once expect()'s room has ended or cancel() has returned.

    secret: what the prefill must prove (None: any peer is accepted, with a warning on rank 0).
    max_sockets: connections to prefill servers open at once (each way). lanes: connections per rank the
    prefill should use (more than one where a single socket cannot fill the link). pin_staging: the KV
    lives on a GPU, so staging buffers are pinned. data_plane: how bytes move (TCP by default).
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
        lanes: int = 1,
        pin_staging: bool = False,
        data_plane: DataPlane | None = None,
    ) -> None:
        layout.rank_layout(rank)  # validates rank
        if advertise_host is None and host in ("0.0.0.0", "::", "*"):
            raise ValueError("advertise_host is required when binding a wildcard address")
        if not 1 <= lanes <= MAX_LANES:
            raise ValueError(f"lanes must be in [1, {MAX_LANES}], got {lanes}")
        super().__init__(f"kv-receiver-{rank}", on_event)
        self.layout = layout
        self.rank = rank
        self.timeout_s = timeout_s
        self.default_bootstrap_port = default_bootstrap_port
        self.max_rooms = max_rooms
        self.max_frame_bytes = max_frame_bytes
        self.lanes = lanes
        self._auth = ClusterAuth(secret)
        self._log = RateLimitedLog(logger)
        self._staging = StagingPool(pin=pin_staging, max_cached_bytes=4 * max_frame_bytes)
        self._out = Outbound(self.ctx, self.poller, max_sockets)
        self._lock = threading.Lock()
        self._rooms: dict[int, ExpectedRoom] = {}
        self._next_sweep = 0.0
        self._bytes = self._draft_bytes = self._completed = self._failed = self._rejected = self._dropped = 0
        self._unauthenticated = 0
        plane = data_plane if data_plane is not None else TcpPlane()
        self._listener = plane.listen(host, port, advertise_host, self, max_sockets, max_frame_bytes,
                                      2 * timeout_s + 10.0)
        self.endpoint = self._listener.endpoint
        if rank == 0 and not self._auth.authenticated:
            logger.warning(UNAUTHENTICATED_WARNING, f"the decode KV receiver {self.endpoint}")
        self._start()

    # ------------------------------------------------------------ engine API

    def expect(
        self, room: int, n_tokens: int, writer: KVWriter, bootstrap_host: str, bootstrap_port: int | None
    ) -> None:
        """Accept the room's KV from now on (every rank, before rank 0's send_register). A null
        bootstrap_port means this server's default_bootstrap_port. A writer with host_segments (pages.py)
        receives bytes in place."""
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
            lanes=self.lanes,
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
                lanes=self.lanes,
            )
            bootstrap = state.bootstrap
        self._submit(_SendCmd(bootstrap, room, encode(reg, self._auth.register_key)))

    def cancel(self, room: int, message: str = "request aborted by the client") -> bool:
        """End the room now (no event follows) and tell its prefill. True if the room was live."""
        with self._lock:
            state = self._rooms.pop(room, None)
        if state is None:
            return False
        state.end()  # waits for bytes being written into the room's pages
        self._submit(_SendCmd(state.bootstrap, room, encode(Abort(room, message), state.keys.to_prefill)))
        return True

    def stats(self) -> ReceiverStats:
        return ReceiverStats(
            self._bytes,
            self._draft_bytes,
            self._completed,
            self._failed,
            len(self._rooms),
            self._rejected + self._listener.refused,
            self._dropped,
            self._unauthenticated,
            self._staging.in_use,
            self._listener.connections(),
        )

    # ------------------------------------------------------------ IO thread

    def _on_command(self, cmd: _SendCmd) -> None:
        try:
            self._out.send(cmd.endpoint, cmd.room, cmd.frames, time.monotonic())
        except SEND_ERRORS as exc:
            self._fail_room(cmd.room, f"cannot reach the prefill server at {cmd.endpoint}: {exc}", tell=False)

    def _on_sockets(self, ready: dict[Any, int]) -> None:
        self._out.on_writable(ready, time.monotonic())

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
        self._listener.close()

    # ------------------------------------------------------------ data plane (its threads)

    def land(self, header: memoryview, tag: memoryview, sizes: Sequence[int]) -> Landing:
        """Where a message's payload goes, decided from its header (StreamSink)."""
        try:
            kind, room = peek(header)
            if kind == Tag.REGISTER:
                raise ProtocolError("REGISTER sent to a decode rank")
            if kind == Tag.LAYER_KV:
                msg = decode([header, tag, *(b"" for _ in sizes)])
            elif len(sizes) > _CONTROL_FRAMES[kind]:  # before anything is allocated for them
                raise ProtocolError(
                    f"{kind.name} carries {len(sizes)} frames, at most {_CONTROL_FRAMES[kind]}"
                )
        except ProtocolError as exc:
            self._rejected += 1
            self._log.warning("malformed", "rank %d rejected a message: %s", self.rank, exc)
            return Landing.discard()
        with self._lock:
            state = self._rooms.get(room)
        if state is None:
            self._dropped += 1
            logger.debug("rank %d dropped %s for room %d, which it does not expect", self.rank, kind.name,
                         room)
            return Landing.discard()
        if not signed_by(state.keys.to_decode, [header, tag]):
            self._unauthenticated += 1
            self._log.warning("unauthenticated", "rank %d dropped %s for room %d: its tag is not the room's",
                              self.rank, kind.name, room)
            return Landing.discard()
        if kind != Tag.LAYER_KV:
            return self._control_landing(state, bytes(header), bytes(tag), sizes)
        assert isinstance(msg, LayerKV)
        problem = state.layer_problem(msg, self.layout.kv.num_layers, self.rank)
        if problem is None:
            landing, problem = layer_landing(state, msg, sizes, self.layout, self._staging,
                                             lambda n, p: self._on_layer(state, msg, n, p))
            if landing is not None:
                return landing
        self._rejected += 1
        self._end_room(state, problem, tell=True)
        return Landing.discard()

    def _control_landing(
        self, state: ExpectedRoom, header: bytes, tag: bytes, sizes: Sequence[int]
    ) -> Landing:
        """DONE and ABORT: small payloads, read into buffers of their own, then acted on."""
        bufs = [bytearray(n) for n in sizes]

        def finish() -> None:
            try:
                msg = decode([header, tag, *bufs])
            except ProtocolError as exc:
                self._rejected += 1
                self._log.warning("malformed", "rank %d rejected a message: %s", self.rank, exc)
                return
            if isinstance(msg, Abort):
                self._end_room(state, f"prefill server aborted the room: {msg.message}", tell=False)
            elif isinstance(msg, Done):
                self._on_done(state, msg)

        return Landing([memoryview(b) for b in bufs], state.lock, state.is_live, finish)

    def _on_layer(self, state: ExpectedRoom, msg: LayerKV, nbytes: int, problem: str | None) -> None:
        """A chunk has landed in the room's pages (problem: why the room fails instead)."""
        if problem is not None:
            self._end_room(state, problem, tell=True)
            return
        now = time.monotonic()
        draft = msg.layer >= self.layout.kv.num_layers
        with self._lock:
            if self._rooms.get(state.room) is not state:
                return
            if state.first_data is None:
                state.first_data = now
            for layer in range(msg.layer, msg.layer + msg.n_layers):
                state.next_start[layer] = msg.token_start + msg.n_tokens
            state.nbytes += nbytes
            self._bytes += nbytes
            if draft:
                state.draft_nbytes += nbytes
                self._draft_bytes += nbytes
            state.deadline = now + self.timeout_s
            done = state.done
        if done is not None:
            self._on_done(state, done)

    def _on_done(self, state: ExpectedRoom, msg: Done) -> None:
        now = time.monotonic()
        with self._lock:
            if self._rooms.get(state.room) is not state:
                return
            problem = state.done_problem(msg, self.layout.kv.num_layers, self.rank)
            if problem is not None and state.lanes > 1:
                state.done = msg  # layers on other lanes may still be on their way
                return
            if problem is None:
                del self._rooms[state.room]
                self._completed += 1
        if problem is not None:
            self._rejected += 1
            self._end_room(state, problem, tell=True)
            return
        state.end()
        seconds = 0.0 if state.first_data is None else now - state.first_data
        self._events.emit([
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
        ])

    def _end_room(self, state: ExpectedRoom, message: str, tell: bool) -> None:
        with self._lock:
            if self._rooms.get(state.room) is not state:
                return
            del self._rooms[state.room]
            self._failed += 1
        state.end()
        if tell:
            self._submit(_SendCmd(state.bootstrap, state.room,
                                  encode(Abort(state.room, message), state.keys.to_prefill)))
        self._events.emit([RoomFailed(state.room, message)])

    def _fail_room(self, room: int, message: str, tell: bool) -> None:
        with self._lock:
            state = self._rooms.get(room)
        if state is not None:
            self._end_room(state, message, tell)
