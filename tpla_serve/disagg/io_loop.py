"""The background thread that owns a transport's ZMQ sockets, and its outbound PUSH sockets.

ZMQ sockets are not thread-safe, so each KVSender / KVReceiver keeps all of its sockets on one IO
thread; other threads hand it commands through a queue and wake it with a self-pipe in the same poll.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from tpla_serve.disagg.messages import Frame
from tpla_serve.disagg.transport import ConnectionLimit
from tpla_serve.disagg.waker import Waker

logger = logging.getLogger(__name__)

_STOP = object()


class IOLoop:
    """Runs `_on_command`, `_on_sockets` and `_on_tick` on one thread; an exception in one of them is
    logged and the loop goes on, so a bad message or a buggy callback never stops the transport."""

    def __init__(self, name: str, tick_s: float = 0.05) -> None:
        self.ctx = zmq.Context()
        self.poller = zmq.Poller()
        self._waker = Waker()
        self.poller.register(self._waker.fileno(), zmq.POLLIN)
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._tick_s = tick_s
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _start(self) -> None:
        self._thread.start()

    def _submit(self, command: Any, wake: bool = True) -> None:
        """Queue a command; wake=False leaves it for the thread's next wake-up (another command's, or its
        tick at the latest)."""
        if self._closed:
            raise RuntimeError(f"{self._thread.name} is closed")
        self._commands.put(command)
        if wake:
            self._waker.wake()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the IO thread and close every socket; queued outbound messages are dropped."""
        if self._closed:
            return
        self._submit(_STOP)
        self._closed = True
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.error("%s did not stop within %.1fs", self._thread.name, timeout_s)
            return
        self.ctx.term()
        self._waker.close()

    def _run(self) -> None:
        waker_fd = self._waker.fileno()
        tick_ms = max(1, int(self._tick_s * 1000))
        next_tick = 0.0
        running = True
        while running:
            try:
                ready = dict(self.poller.poll(tick_ms))
                if ready.pop(waker_fd, 0):
                    self._waker.drain()
                while True:
                    try:
                        command = self._commands.get_nowait()
                    except queue.Empty:
                        break
                    if command is _STOP:
                        running = False
                        break
                    self._on_command(command)
                if running:
                    self._flush()
                    self._on_sockets(ready)
                    self._flush()
                    now = time.monotonic()
                    if now >= next_tick:
                        next_tick = now + self._tick_s
                        self._on_tick(now)
            except Exception:
                logger.exception("%s: unexpected error; continuing", self._thread.name)
        try:
            self._on_close()
        except Exception:
            logger.exception("%s: error while closing sockets", self._thread.name)

    def _on_command(self, command: Any) -> None:
        raise NotImplementedError

    def _flush(self) -> None:
        """A round of commands or socket events has been handled: send what it batched."""

    def _on_sockets(self, ready: dict[Any, int]) -> None:
        raise NotImplementedError

    def _on_tick(self, now: float) -> None:
        raise NotImplementedError

    def _on_close(self) -> None:
        raise NotImplementedError


def bind_tcp(sock: zmq.Socket, host: str, port: int) -> int:
    """Bind `sock` on host:port (port 0: any free port) and return the port it got."""
    if ":" in host:
        sock.setsockopt(zmq.IPV6, 1)
        host = host if host.startswith("[") else f"[{host}]"
    sock.bind(f"tcp://{host}:{port or '*'}")
    return int(sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])


def peer_address(frames: Sequence[Any]) -> str:
    """The IP address a received message came from, for logs ("?" where the transport has none)."""
    if frames and isinstance(frames[0], zmq.Frame):
        try:
            return str(frames[0].get("Peer-Address"))
        except zmq.ZMQError:  # ipc:// connections carry no peer address
            pass
    return "?"


SEND_ERRORS = (zmq.ZMQError, ConnectionLimit)


@dataclass
class _Peer:
    socket: zmq.Socket
    last_used: float
    outbox: deque[tuple[int, float, list[Frame]]] = field(default_factory=deque)  # (room, queued_at, frames)
    polling: bool = False


class Outbound:
    """One PUSH socket per remote endpoint (so each peer receives our messages in order), sending without
    blocking: what the socket cannot take now waits in a per-peer outbox, flushed when it is writable.

    IMMEDIATE keeps messages out of ZMQ's queues while a peer is unreachable, so they stay in the outbox
    where a room's failure can drop them. At most `max_sockets` are open at once (each holds file
    descriptors); idle ones close in `sweep`. Only the IO thread may call this.
    """

    def __init__(self, ctx: zmq.Context, poller: zmq.Poller, max_sockets: int, sndhwm: int = 16) -> None:
        if max_sockets < 1:
            raise ValueError(f"max_sockets must be >= 1, got {max_sockets}")
        self._ctx = ctx
        self._poller = poller
        self.max_sockets = max_sockets
        self._sndhwm = sndhwm
        self._peers: dict[str, _Peer] = {}
        self._by_socket: dict[zmq.Socket, _Peer] = {}

    def __len__(self) -> int:
        """Sockets open now."""
        return len(self._peers)

    def is_open(self, endpoint: str) -> bool:
        return endpoint in self._peers

    def send(self, endpoint: str, room: int, frames: list[Frame], now: float) -> None:
        """Queue `frames` for `endpoint` behind anything already queued for it (raises zmq.ZMQError for an
        endpoint ZMQ cannot connect to, ConnectionLimit when every socket allowed is open elsewhere)."""
        peer = self._peers.get(endpoint)
        if peer is None:
            peer = self._connect(endpoint, now)
        peer.last_used = now
        if peer.outbox or not self._try_send(peer.socket, frames):
            peer.outbox.append((room, now, frames))
            if not peer.polling:
                self._poller.register(peer.socket, zmq.POLLOUT)
                peer.polling = True

    def on_writable(self, ready: dict[Any, int], now: float) -> None:
        for sock, flags in ready.items():
            peer = self._by_socket.get(sock)
            if peer is None or not flags & zmq.POLLOUT:
                continue
            while peer.outbox and self._try_send(peer.socket, peer.outbox[0][2]):
                peer.outbox.popleft()
                peer.last_used = now
            self._stop_polling_if_idle(peer)

    def drop_room(self, room: int) -> None:
        """Forget the room's messages that have not reached ZMQ yet."""
        for peer in self._peers.values():
            if any(r == room for r, _, _ in peer.outbox):
                peer.outbox = deque(m for m in peer.outbox if m[0] != room)
                self._stop_polling_if_idle(peer)

    def expire(self, now: float, max_age_s: float) -> set[int]:
        """Drop messages queued longer than max_age_s (their peer is gone); returns their rooms."""
        rooms: set[int] = set()
        for peer in self._peers.values():
            while peer.outbox and now - peer.outbox[0][1] > max_age_s:
                rooms.add(peer.outbox.popleft()[0])
            self._stop_polling_if_idle(peer)
        return rooms

    def sweep(self, now: float, idle_s: float, keep: set[str]) -> None:
        """Close sockets of peers with nothing queued, unused for idle_s and not in `keep`."""
        for endpoint, peer in list(self._peers.items()):
            if endpoint not in keep and not peer.outbox and now - peer.last_used > idle_s:
                self._close_peer(endpoint)

    def close(self) -> None:
        for endpoint in list(self._peers):
            self._close_peer(endpoint)

    def _connect(self, endpoint: str, now: float) -> _Peer:
        if len(self._peers) >= self.max_sockets:
            raise ConnectionLimit(
                f"already has the {self.max_sockets} connections it may open; cannot connect to {endpoint}"
            )
        sock = self._ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self._sndhwm)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.IPV6, 1)  # dual stack: IPv4 endpoints still work
        try:
            sock.connect(endpoint)
        except zmq.ZMQError:
            sock.close()
            raise
        peer = _Peer(socket=sock, last_used=now)
        self._peers[endpoint] = peer
        self._by_socket[sock] = peer
        return peer

    def _close_peer(self, endpoint: str) -> None:
        peer = self._peers.pop(endpoint)
        del self._by_socket[peer.socket]
        if peer.polling:
            self._poller.unregister(peer.socket)
        peer.socket.close()

    def _stop_polling_if_idle(self, peer: _Peer) -> None:
        if peer.polling and not peer.outbox:
            self._poller.unregister(peer.socket)
            peer.polling = False

    @staticmethod
    def _try_send(sock: zmq.Socket, frames: list[Frame]) -> bool:
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        return True
