"""The decode rank's half of the TCP data plane (tcp_stream.py describes the stream): a listener that
accepts a bounded number of peers and, per connection, a reader that lands each payload where the
receiver says, checking every size against its limit before anything is read into memory."""

from __future__ import annotations

import logging
import select
import socket
import threading

from tpla_serve.disagg.auth import TAG_BYTES
from tpla_serve.disagg.bootstrap import tcp_endpoint
from tpla_serve.disagg.log_limit import RateLimitedLog
from tpla_serve.disagg.messages import MAX_HEADER_BYTES
from tpla_serve.disagg.tcp_stream import MAX_PAYLOAD_FRAMES, PREFIX, SIZE, TcpSender
from tpla_serve.disagg.transport import Landing, StreamSink
from tpla_serve.disagg.waker import Waker

logger = logging.getLogger(__name__)

_DRAIN_BYTES = 1 << 18
_LOWAT = 1 << 17  # wake for a payload only once this much of it (or all that is left) has arrived


class _Closed(Exception):
    """The peer closed the connection, went quiet for too long, or the listener is closing."""


class TcpListener:
    """DataListener over TCP: accepts up to max_connections peers, one reader thread each."""

    def __init__(
        self, host: str, port: int, advertise_host: str | None, sink: StreamSink, max_connections: int,
        max_frame_bytes: int, idle_timeout_s: float,
    ) -> None:
        bind = "0.0.0.0" if host == "*" else host.strip("[]")
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        self._sock = socket.create_server((bind, port), family=family, backlog=128)
        self.endpoint = tcp_endpoint(advertise_host or host, self._sock.getsockname()[1])
        self._sink = sink
        self.max_connections = max_connections
        self.max_frame_bytes = max_frame_bytes
        self.idle_timeout_ms = max(1, int(idle_timeout_s * 1000))
        self.refused = 0  # connections or envelopes past a limit
        self._log = RateLimitedLog(logger)
        self._waker = Waker()
        self._closed = False
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._thread = threading.Thread(target=self._accept, name=f"kv-listen {self.endpoint}", daemon=True)
        self._thread.start()

    def connections(self) -> int:
        return len(self._conns)

    def close(self) -> None:
        self._closed = True
        self._waker.wake()
        self._thread.join(5.0)
        with self._lock:
            threads = list(self._conns.values())
        for t in threads:
            t.join(5.0)
        self._sock.close()
        self._waker.close()

    def _accept(self) -> None:
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        poller.register(self._waker.fileno(), select.POLLIN)
        while not self._closed:
            if not poller.poll(1000) or self._closed:
                continue
            try:
                conn, peer = self._sock.accept()
            except OSError:
                continue
            with self._lock:
                if len(self._conns) >= self.max_connections:
                    self.refused += 1
                    self._log.warning("conns", "%s refused a connection from %s: %d open", self.endpoint,
                                      peer, len(self._conns))
                    conn.close()
                    continue
                thread = threading.Thread(target=self._serve, args=(conn, peer), daemon=True,
                                          name=f"kv-recv {self.endpoint}")
                self._conns[conn] = thread
            thread.start()

    def _serve(self, conn: socket.socket, peer: object) -> None:
        try:
            conn.setblocking(False)
            if conn.family != socket.AF_UNIX:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            poller = select.poll()
            poller.register(conn, select.POLLIN)
            poller.register(self._waker.fileno(), select.POLLIN)
            _Reader(self, conn, poller, peer).run()
        except _Closed:
            pass
        except Exception:
            logger.exception("%s: reader for %s failed", self.endpoint, peer)
        finally:
            with self._lock:
                del self._conns[conn]
            conn.close()


class _Reader:
    """Reads one connection's envelopes, headers and payloads (see the module docstring)."""

    def __init__(self, listener: TcpListener, conn: socket.socket, poller: select.poll, peer: object) -> None:
        self.listener, self.conn, self.poller, self.peer = listener, conn, poller, peer
        # The envelope, header and tag of one message: its prefix, then the rest in one read.
        envelope = PREFIX.size + SIZE.size * MAX_PAYLOAD_FRAMES
        self.head = memoryview(bytearray(envelope + MAX_HEADER_BYTES + TAG_BYTES))
        self.scratch: memoryview | None = None
        self.lowat = 1

    def run(self) -> None:
        lst = self.listener
        while not lst._closed:
            self._fill(self.head[: PREFIX.size])
            header_len, n = PREFIX.unpack_from(self.head)
            if not 0 < header_len <= MAX_HEADER_BYTES or n > MAX_PAYLOAD_FRAMES:
                self._refuse(f"an envelope of a {header_len}-byte header and {n} frames")
            header_at = PREFIX.size + SIZE.size * n
            self._fill(self.head[PREFIX.size : header_at + header_len + TAG_BYTES])
            sizes = [SIZE.unpack_from(self.head, PREFIX.size + SIZE.size * i)[0] for i in range(n)]
            if any(s > lst.max_frame_bytes for s in sizes):
                self._refuse(f"a frame of {max(sizes)} bytes (the limit is {lst.max_frame_bytes})")
            header, tag_at = self.head[header_at : header_at + header_len], header_at + header_len
            landing = lst._sink.land(header, self.head[tag_at : tag_at + TAG_BYTES], sizes)
            self._payload(landing, sum(sizes))

    def _refuse(self, what: str) -> None:
        self.listener.refused += 1
        self.listener._log.warning("refused", "%s closed the connection from %s: %s", self.listener.endpoint,
                                   self.peer, what)
        raise _Closed

    def _wait(self, want: int) -> None:
        """Until `want` more bytes (up to _LOWAT) can be read: one wake-up per large piece, not per packet."""
        if self.listener._closed:
            raise _Closed
        lowat = max(1, min(want, _LOWAT))
        if lowat != self.lowat and self.conn.family != socket.AF_UNIX:
            self.conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
            self.lowat = lowat
        if not self.poller.poll(self.listener.idle_timeout_ms):
            raise _Closed

    def _recv(self, view: memoryview) -> int:
        """Bytes read into view now (0: none available yet); _Closed at the end of the stream."""
        try:
            k = self.conn.recv_into(view)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            raise _Closed from exc
        if k == 0:
            raise _Closed
        return k

    def _fill(self, view: memoryview) -> None:
        got = 0
        while got < view.nbytes:
            k = self._recv(view[got:])
            if not k:
                self._wait(view.nbytes - got)
            got += k

    def _payload(self, landing: Landing, total: int) -> None:
        if sum(s.nbytes for s in landing.segments) != total:
            landing.abandon("the landing does not match the payload's size")
            landing = Landing.discard()
        left = total
        lock = landing.lock
        try:
            for seg in landing.segments:
                got = 0
                while got < seg.nbytes:
                    if lock is not None:
                        lock.acquire()
                    try:
                        if not landing.live():
                            break
                        k = self._recv(seg[got:])
                    finally:
                        if lock is not None:
                            lock.release()
                    if not k:
                        self._wait(left - got)
                    got += k
                left -= got
                if got < seg.nbytes:
                    break
        except _Closed:
            landing.abandon("the connection closed mid-message")
            raise
        if left:
            self._drain(left)
        else:
            landing.finish()

    def _drain(self, n: int) -> None:
        if self.scratch is None:
            self.scratch = memoryview(bytearray(_DRAIN_BYTES))
        while n:
            k = self._recv(self.scratch[: min(n, _DRAIN_BYTES)])
            if not k:
                self._wait(n)
            n -= k


class TcpPlane:
    """The DataPlane of plain sockets."""

    def sender(self, timeout_s: float, max_connections: int) -> TcpSender:
        return TcpSender(timeout_s, max_connections)

    def listen(
        self, host: str, port: int, advertise_host: str | None, sink: StreamSink, max_connections: int,
        max_frame_bytes: int, idle_timeout_s: float,
    ) -> TcpListener:
        return TcpListener(host, port, advertise_host, sink, max_connections, max_frame_bytes, idle_timeout_s)
