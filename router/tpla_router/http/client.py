"""Pooled HTTP/1.1 client for the workers: keep-alive connections, one exchange at a time on each.

`UpstreamPool.send()` writes the request at once (on an idle pooled connection, or as soon as a new
one connects) and returns an `UpstreamResponse` whose `ready` future completes when the answer is in
(or, for a streamed answer, its head), so the router waits on two workers at once without a task
per call. Idle connections are dropped after `keepalive_secs`, before the usual server-side keep-alive
limits (uvicorn's 5 s) close them under a request. Nothing is resent here: a request on a connection
that breaks fails, and the router's own retry decides what to do.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from typing import cast
from urllib.parse import urlsplit

import httptools

Header = tuple[bytes, bytes]
Body = Sequence[bytes | memoryview]

_INLINE_BODY = 64 << 10  # bodies up to this size go out in the same write as the request head
_HIGH_WATER = 1 << 20  # a streamed answer buffering more than this unread pauses reading from the worker


class UpstreamError(Exception):
    """No usable HTTP answer came back from a worker."""


class UpstreamUnreachable(UpstreamError):
    """No connection could be made."""


class UpstreamBroken(UpstreamError):
    """The connection closed, or the answer was malformed, before the answer was complete."""


class UpstreamTimeout(UpstreamError):
    """The deadline passed before the answer was complete."""


class UpstreamResponse:
    """One exchange with a worker, from the moment the request is sent.

    Buffered (stream=False): `ready` completes once the whole answer is in; `body()` then returns it.
    Streamed: `ready` completes when the status line and headers are in; `read()` returns the body as
    it arrives. Either way `ready` fails with an UpstreamError, and `close()` must be called when done
    with the exchange (it abandons the connection if the answer is not complete yet).
    """

    __slots__ = ("_buffered", "_chunks", "_closed", "_conn", "_connect_task", "_error", "_finished", "_loop",
                 "_paused", "_reader", "_request", "_stream", "_timer", "content_type", "ready", "status")

    def __init__(self, loop: asyncio.AbstractEventLoop, request: Body, stream: bool, deadline: float) -> None:
        self.status: int | None = None
        self.content_type: bytes | None = None
        self.ready: asyncio.Future[None] = loop.create_future()
        self._loop = loop
        self._request = request
        self._stream = stream
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._finished = False
        self._closed = False
        self._error: UpstreamError | None = None
        self._reader: asyncio.Future[None] | None = None
        self._conn: _Connection | None = None
        self._connect_task: asyncio.Task[None] | None = None
        self._timer = loop.call_at(deadline, self._on_timeout)

    def body(self) -> bytes:
        """The whole answer of a buffered exchange (valid once `ready` completed without error)."""
        chunks = self._chunks
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def read_nowait(self) -> bytes | None:
        """Streamed exchange: the body bytes that arrived since the last read, b"" at the end, None if none yet."""
        chunks = self._chunks
        if chunks:
            self._chunks = []
            self._buffered = 0
            if self._paused and self._conn is not None:
                self._paused = False
                self._conn.transport.resume_reading()
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if self._error is not None:
            raise self._error
        return b"" if self._finished else None

    def data_ready(self) -> asyncio.Future[None]:
        """Streamed exchange: completes once `read_nowait()` has something to say (bytes, the end, an error)."""
        future = self._loop.create_future()
        if self._chunks or self._finished or self._error is not None:
            future.set_result(None)
        else:
            self._reader = future
        return future

    async def read(self) -> bytes:
        """Streamed exchange: the body bytes that arrived since the last call; b"" once the answer is complete."""
        while True:
            data = self.read_nowait()
            if data is not None:
                return data
            await self.data_ready()

    def detach(self) -> None:
        """Let a buffered exchange run to its end unattended: its answer is not needed, but cutting it short
        would abort the work on the worker."""
        if self.ready.done():
            self.close()
        else:
            self.ready.add_done_callback(lambda _: self.close())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._timer.cancel()
        if self._connect_task is not None:
            self._connect_task.cancel()
        conn, self._conn = self._conn, None
        if conn is not None and not self._finished:
            conn.abandon()
        ready = self.ready
        if ready.done() and not ready.cancelled():
            ready.exception()  # an error nobody awaited after all is not worth a warning
        elif not ready.done():
            ready.cancel()

    # ---- events from the connection -----------------------------------------------------------

    def _on_head(self) -> None:
        if self._stream and not self.ready.done():
            self.ready.set_result(None)

    def _on_body(self, data: bytes) -> None:
        self._chunks.append(data)
        if not self._stream:
            return
        self._wake()
        self._buffered += len(data)
        if self._buffered > _HIGH_WATER and not self._paused and self._conn is not None:
            self._paused = True
            self._conn.transport.pause_reading()

    def _on_done(self) -> None:
        self._finished = True
        if self._paused and self._conn is not None:  # the connection goes back to the pool: it must read again
            self._paused = False
            self._conn.transport.resume_reading()
        self._conn = None
        self._timer.cancel()
        if not self.ready.done():
            self.ready.set_result(None)
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        if self._finished or self._closed or self._error is not None:
            return
        self._error = error
        self._conn = None
        self._timer.cancel()
        if not self.ready.done():
            self.ready.set_exception(error)
        self._wake()

    def _wake(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None and not reader.done():
            reader.set_result(None)

    def _on_timeout(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abandon()
        if self._connect_task is not None:
            self._connect_task.cancel()
        self._fail(UpstreamTimeout("timed out"))


class _Connection(asyncio.Protocol):
    """One keep-alive connection to a worker, carrying at most one exchange at a time."""

    __slots__ = ("_exchange", "_framed", "_interim", "_parser", "_pool", "idle_since", "transport")

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self._exchange: UpstreamResponse | None = None
        self._framed = False  # the answer has a Content-Length or Transfer-Encoding (else it ends at close)
        self._interim = False  # a 1xx answer, to be skipped
        self.idle_since = 0.0

    def start(self, exchange: UpstreamResponse) -> None:
        self._exchange = exchange
        self._framed = False
        exchange._conn = self
        request = exchange._request
        if len(request) == 1:
            self.transport.write(request[0])
        else:
            self.transport.writelines(request)

    def abandon(self) -> None:
        """Drop the exchange in progress; the connection cannot be reused."""
        self._exchange = None
        self.transport.abort()

    # ---- asyncio protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport


    def data_received(self, data: bytes) -> None:
        if self._exchange is None:  # a worker speaking unasked: nothing on this connection can be trusted
            self.transport.abort()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            exchange, self._exchange = self._exchange, None
            self.transport.abort()
            if exchange is not None:
                exchange._fail(UpstreamBroken(f"malformed answer: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._pool._discard(self)
        exchange, self._exchange = self._exchange, None
        if exchange is None:
            return
        if exchange.status is not None and not self._framed and not self._interim:
            exchange._on_done()  # a close-delimited answer ends here
            return
        reason = f": {exc}" if exc is not None else ""
        exchange._fail(UpstreamBroken(f"connection closed before the answer was complete{reason}"))

    # ---- parser callbacks ----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-type":
            assert self._exchange is not None
            self._exchange.content_type = value
        elif name == b"content-length" or name == b"transfer-encoding":
            self._framed = True

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        self._interim = status < 200
        if self._interim:
            return
        exchange = self._exchange
        assert exchange is not None
        exchange.status = status
        exchange._on_head()

    def on_body(self, body: bytes) -> None:
        assert self._exchange is not None
        self._exchange._on_body(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            self._framed = False
            return
        exchange, self._exchange = self._exchange, None
        assert exchange is not None
        keep_alive = self._parser.should_keep_alive()
        exchange._on_done()
        if keep_alive:
            self._pool._release(self)
        else:
            self.transport.close()


class UpstreamPool:
    """Connections to one worker, reused across requests.

    `headers` go on every request (the router's own credentials for its workers).
    """

    def __init__(self, url: str, headers: tuple[Header, ...] = (), connect_timeout_secs: float = 5.0,
                 keepalive_secs: float = 4.0, max_idle: int = 1024) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"worker url must be http(s)://host[:port], got {url!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._prefix = parts.path.rstrip("/").encode()
        static = [b"Host: ", parts.netloc.rpartition("@")[2].encode(), b"\r\n"]  # never any user:password@
        for name, value in headers:
            static += (name, b": ", value, b"\r\n")
        self._static = b"".join(static)
        self._connect_timeout = connect_timeout_secs
        self._keepalive = keepalive_secs
        self._max_idle = max_idle
        self._idle: list[_Connection] = []
        self._closed = False

    def send(self, method: bytes, path: bytes, body: Body, deadline: float, *, stream: bool = False,
             content_type: bytes = b"application/json") -> UpstreamResponse:
        """Send a request now; `deadline` (loop time) bounds the whole exchange, connecting included."""
        loop = asyncio.get_running_loop()
        size = sum(map(len, body))
        head = b"%b %b%b HTTP/1.1\r\n%b" % (method, self._prefix, path, self._static)
        if size or method != b"GET":
            head += b"Content-Type: %b\r\nContent-Length: %d\r\n\r\n" % (content_type, size)
        else:
            head += b"\r\n"
        request: Body = (b"".join((head, *body)),) if size <= _INLINE_BODY else (head, *body)
        exchange = UpstreamResponse(loop, request, stream, deadline)
        idle = self._idle
        now = loop.time()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < self._keepalive:
                conn.start(exchange)
                return exchange
            conn.transport.close()
        exchange._connect_task = loop.create_task(self._connect(exchange, deadline))
        return exchange

    async def _connect(self, exchange: UpstreamResponse, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        timeout = min(self._connect_timeout, deadline - loop.time())
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self), self._host, self._port, ssl=self._ssl),
                timeout=max(timeout, 0.0))
        except asyncio.TimeoutError:
            exchange._fail(UpstreamUnreachable(f"could not connect within {self._connect_timeout} s")
                           if timeout == self._connect_timeout else UpstreamTimeout("timed out while connecting"))
            return
        except OSError as e:
            exchange._fail(UpstreamUnreachable(str(e) or type(e).__name__))
            return
        finally:
            exchange._connect_task = None
        if exchange._closed or exchange._error is not None:  # the caller gave up meanwhile
            self._release(conn)
        else:
            conn.start(exchange)

    def _release(self, conn: _Connection) -> None:
        if self._closed or len(self._idle) >= self._max_idle:
            conn.transport.close()
            return
        conn.idle_since = asyncio.get_running_loop().time()
        self._idle.append(conn)

    def _discard(self, conn: _Connection) -> None:
        if conn in self._idle:
            self._idle.remove(conn)

    def close(self) -> None:
        """Close idle connections now and busy ones as their exchanges end (the worker left the router)."""
        self._closed = True
        for conn in self._idle:
            conn.transport.close()
        self._idle.clear()
