"""The TCP data plane (transport.py): prefill → decode rank messages over plain sockets, zero-copy;
this module has the stream format and the sending half, tcp_listen.py the receiving half and TcpPlane.

On the stream each message is an envelope — header length (u32) and payload frame count (u8), then each
payload frame's size (u64) — then the msgpack header, its 16-byte tag and the payload frames' raw bytes.
The sender writes a lane's queued messages with one sendmsg over their buffers (staged slices and the
engine's own tensors, never copied in user space), so a small layer, or DONE behind the last layer, shares
a write with what precedes it; a message whose buffers must be prepared first (a GPU copy waited for)
starts a new write. A decode rank reads each envelope and header into fixed buffers, asks the
receiver where the payload goes and recv_into()s it there: straight into the room's KV pages on the CPU, into
a pinned staging buffer for one device copy on a GPU. Frames past max_frame_bytes or headers past their
limit close the connection before anything is allocated for them.
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tpla_serve.disagg.transport import ConnectionLimit, SendDone
from tpla_serve.disagg.wire import Frame

logger = logging.getLogger(__name__)

PREFIX = struct.Struct("<IB")
SIZE = struct.Struct("<Q")
MAX_PAYLOAD_FRAMES = 64  # a LAYER_KV of MAX_BATCH_LAYERS layers
_BATCH_BUFFERS = 960  # below IOV_MAX (1024) buffers per sendmsg
_BATCH_BYTES = 32 << 20


def envelope(frames: Sequence[Frame]) -> list[memoryview]:
    """The buffers that put `frames` (header, tag, payload...) on a byte stream."""
    views = [memoryview(f).cast("B") for f in frames]
    prefix = PREFIX.pack(views[0].nbytes, len(views) - 2) + b"".join(SIZE.pack(v.nbytes) for v in views[2:])
    return [memoryview(prefix), *views]


def _address(endpoint: str) -> tuple[int, object]:
    if endpoint.startswith("ipc://"):
        return socket.AF_UNIX, endpoint[len("ipc://") :]
    host, port = endpoint[len("tcp://") :].rsplit(":", 1)
    if host.startswith("["):
        return socket.AF_INET6, (host[1:-1], int(port))
    return socket.AF_INET, (host, int(port))


@dataclass
class _Message:
    room: int
    buffers: list[memoryview]
    on_done: SendDone
    prepare: Callable[[], None] | None = None


class _Lane:
    """One connection to an endpoint and the thread that writes its queue, in order."""

    def __init__(self, endpoint: str, timeout_s: float) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.queue: deque[_Message] = deque()
        self.cond = threading.Condition()
        self.closed = False
        self.sending = False
        self.last_used = time.monotonic()
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name=f"kv-stream {endpoint}", daemon=True)
        self._thread.start()

    def put(self, msg: _Message) -> None:
        with self.cond:
            self.queue.append(msg)
            self.last_used = time.monotonic()
            self.cond.notify()

    def drop_room(self, room: int) -> list[_Message]:
        with self.cond:
            dropped = [m for m in self.queue if m.room == room]
            if dropped:
                self.queue = deque(m for m in self.queue if m.room != room)
        return dropped

    def idle(self) -> bool:
        with self.cond:
            return not self.queue and not self.sending

    def close(self) -> list[_Message]:
        with self.cond:
            self.closed = True
            left, self.queue = list(self.queue), deque()
            self.cond.notify()
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # unblocks a send in progress
            except OSError:
                pass
        self._thread.join(5.0)
        return left

    def _take(self) -> list[_Message] | None:
        with self.cond:
            while not self.queue and not self.closed:
                self.cond.wait()
            if self.closed:
                return None
            batch, buffers, nbytes = [], 0, 0
            while self.queue and (not batch or (
                buffers + len(self.queue[0].buffers) <= _BATCH_BUFFERS and nbytes < _BATCH_BYTES
            )):
                msg = self.queue.popleft()
                batch.append(msg)
                buffers += len(msg.buffers)
                nbytes += sum(b.nbytes for b in msg.buffers)
            self.sending = True
            return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            error = None
            try:
                idle = time.monotonic() - self.last_used > 1.0
                if self._sock is not None and idle and _peer_closed(self._sock):
                    self._drop_socket()  # the decode closed it while idle: what we wrote now would be lost
                if self._sock is None:
                    self._sock = self._connect()
                _send_prepared(self._sock, batch)
            except OSError as exc:
                error = f"cannot send to {self.endpoint}: {exc}"
                self._drop_socket()
            for msg in batch:
                _done(msg, error)
            with self.cond:
                self.sending = False
                self.last_used = time.monotonic()
                failed = list(self.queue) if error is not None else []
                if failed:
                    self.queue.clear()
            for msg in failed:
                _done(msg, error)
        self._drop_socket()

    def _connect(self) -> socket.socket:
        family, address = _address(self.endpoint)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout_s)
            sock.connect(address)
            if family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            sock.close()
            raise
        return sock

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _done(msg: _Message, error: str | None) -> None:
    msg.buffers = []
    try:
        msg.on_done(error)
    except Exception:  # the transport's callback failing must not stop the lane
        logger.exception("kv stream: on_done failed for room %d", msg.room)


def _peer_closed(sock: socket.socket) -> bool:
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and not sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return True


def _send_prepared(sock: socket.socket, batch: list[_Message]) -> None:
    """Each message once prepared, in one write with those behind it that need no preparing: no message
    waits for a later one's preparation (a GPU copy that may still be running)."""
    i = 0
    while i < len(batch):
        if batch[i].prepare is not None:
            batch[i].prepare()
        j = i + 1
        while j < len(batch) and batch[j].prepare is None:
            j += 1
        _send_all(sock, [b for m in batch[i:j] for b in m.buffers])
        i = j


def _send_all(sock: socket.socket, buffers: list[memoryview]) -> None:
    i = 0
    while i < len(buffers):
        sent = sock.sendmsg(buffers[i : i + _BATCH_BUFFERS])
        while i < len(buffers) and sent >= buffers[i].nbytes:
            sent -= buffers[i].nbytes
            i += 1
        if sent:
            buffers[i] = buffers[i][sent:]


class TcpSender:
    """DataSender over TCP: `lanes` connections per endpoint, each with its own writer thread."""

    def __init__(self, timeout_s: float, max_connections: int) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self._lanes: dict[tuple[str, int], _Lane] = {}

    def send(
        self, endpoint: str, lane: int, room: int, frames: Sequence[Frame], on_done: SendDone,
        prepare: Callable[[], None] | None = None,
    ) -> None:
        key = (endpoint, lane)
        conn = self._lanes.get(key)
        if conn is None:
            if len(self._lanes) >= self.max_connections:
                raise ConnectionLimit(
                    f"already has the {self.max_connections} connections it may open; cannot connect to "
                    f"{endpoint}"
                )
            conn = self._lanes[key] = _Lane(endpoint, self.timeout_s)
        conn.put(_Message(room, envelope(frames), on_done, prepare))

    def drop_room(self, room: int) -> None:
        for conn in self._lanes.values():
            for msg in conn.drop_room(room):
                _done(msg, f"room {room} ended")

    def sweep(self, idle_s: float, keep: set[str]) -> None:
        now = time.monotonic()
        for key, conn in list(self._lanes.items()):
            if key[0] not in keep and conn.idle() and now - conn.last_used > idle_s:
                del self._lanes[key]
                conn.close()

    def connections(self) -> int:
        return len(self._lanes)

    def is_open(self, endpoint: str) -> bool:
        return (endpoint, 0) in self._lanes

    def close(self) -> None:
        lanes, self._lanes = list(self._lanes.values()), {}
        for conn in lanes:
            for msg in conn.close():
                _done(msg, "the sender closed")
