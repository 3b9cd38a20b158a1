"""HTTP/1.1 server: keep-alive, pipelined requests answered in order, bounded input, streamed answers.

Limits hold before anything is buffered: a Content-Length over the limit is refused from the head
alone and a chunked body as soon as it grows past the limit. A refusal (400, 413, 431) goes out with
`Connection: close`, and the rest of the upload is read and dropped for a short linger so the client
sees the answer rather than a reset. Each request runs its handler in one task; the client going
away cancels that task, which is how the router learns to abort the request on its workers.
"""

from __future__ import annotations

import asyncio
import http
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate
from typing import cast
from urllib.parse import parse_qsl

import httptools

logger = logging.getLogger(__name__)

Header = tuple[bytes, bytes]


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int
    max_head_bytes: int = 64 << 10
    # A connection with no request in progress and no input for this long is closed.
    idle_timeout_secs: float = 75.0
    # After a refusal, input is read and dropped this long before the connection closes.
    linger_secs: float = 2.0
    # Requests queued on one connection (pipelining) before the server stops reading from it.
    max_pipelined: int = 32


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    return f"HTTP/1.1 {status} {phrase}\r\n".encode()


_STATUS_LINES = {s.value: _status_line(s.value) for s in http.HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_INLINE_BODY = 64 << 10  # bodies up to this size go out in the same write as their head


class Request:
    """One parsed request. Header names are lower-case bytes; repeated headers are joined by ', '."""

    __slots__ = ("body", "headers", "http11", "keep_alive", "method", "path", "query_string")

    def __init__(self, method: bytes, path: str, query_string: bytes, headers: dict[bytes, bytes], body: bytes,
                 keep_alive: bool, http11: bool = True) -> None:
        self.method = method
        self.path = path
        self.query_string = query_string
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.http11 = http11  # else HTTP/1.0: no chunked answers

    def query(self) -> dict[str, str]:
        return dict(parse_qsl(self.query_string.decode("utf-8", "replace"), keep_blank_values=True))


class Response:
    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(self, status: int, body: bytes = b"", content_type: bytes = b"application/json",
                 headers: tuple[Header, ...] = ()) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers


Handler = Callable[[Request, "ResponseWriter"], Awaitable["Response | None"]]
ErrorResponse = Callable[[int, str], Response]


class _Refused(Exception):
    """Raised from a parser callback: the request breaks a limit and is answered with `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _head(status: int, content_type: bytes, headers: tuple[Header, ...], date: bytes, keep_alive: bool) -> list[bytes]:
    parts = [_STATUS_LINES.get(status) or _status_line(status), b"Content-Type: ", content_type, b"\r\n", date]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    if not keep_alive:
        parts.append(b"Connection: close\r\n")
    return parts


class ResponseWriter:
    """Streams one answer: chunked transfer coding, or close-delimited for HTTP/1.0 clients.

    A handler that calls `start()` owns the answer and returns None once it called `end()`. The head
    goes out with the first bytes, and `end(data)` sends the last bytes with the terminator: one
    write each, so a short stream costs few syscalls.
    """

    __slots__ = ("_conn", "_head", "chunked", "ended", "started")

    def __init__(self, conn: _Connection, chunked: bool) -> None:
        self._conn = conn
        self._head = b""
        self.chunked = chunked
        self.started = False
        self.ended = False

    def start(self, status: int, content_type: bytes, headers: tuple[Header, ...] = ()) -> None:
        if self._conn.closed:
            raise ConnectionResetError("the client went away")
        self.started = True
        parts = _head(status, content_type, headers, self._conn.server.date_header, self.chunked)
        parts.append(b"Transfer-Encoding: chunked\r\n\r\n" if self.chunked else b"\r\n")
        self._head = b"".join(parts)

    async def write(self, data: bytes) -> None:
        """Send `data` now; waits while the client is not reading (the transport's buffer is full)."""
        conn = self._conn
        if conn.closed:
            raise ConnectionResetError("the client went away")
        if not data:
            return
        conn.transport.write(self._framed(data))
        if conn.write_paused:
            await conn.drained()

    def end(self, data: bytes = b"") -> None:
        """Send `data` (if any) and finish the answer."""
        self.ended = True
        if self._conn.closed:
            return
        out = self._framed(data) if data else self._take_head()
        if self.chunked:
            out += b"0\r\n\r\n"
        if out:
            self._conn.transport.write(out)

    def _framed(self, data: bytes) -> bytes:
        return self._take_head() + (b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)

    def _take_head(self) -> bytes:
        head, self._head = self._head, b""
        return head


class _Connection(asyncio.Protocol):
    """One client connection: parses requests, runs their handlers one at a time, writes answers in order."""

    __slots__ = ("_body", "_body_bytes", "_close_after", "_drain", "_head_bytes", "_head_pending", "_headers",
                 "_in_body", "_limits", "_parser", "_queue", "_read_paused", "_refusing", "_task", "_url", "closed",
                 "last_input", "server", "transport", "write_paused")

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self._limits = server.limits
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._head_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._in_body = False  # between the end of a request's head and the end of its body
        self._head_pending = 0  # bytes received since the current request's head began
        self._queue: deque[Request | Response] = deque()
        self._task: asyncio.Task[None] | None = None
        self._refusing = False
        self._close_after = False
        self._read_paused = False
        self._drain: asyncio.Future[None] | None = None
        self.write_paused = False
        self.closed = False
        self.last_input = server.now

    # ---- asyncio protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.last_input = self.server.now
        if self._refusing:
            return
        if not self._in_body:
            self._head_pending += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if not isinstance(cause, _Refused):
                logger.error("request parsing failed", exc_info=cause)
                self._refuse(500, "internal error while reading the request")
                return
            self._refuse(cause.status, cause.message)
        except httptools.HttpParserUpgrade:
            # The request asking to upgrade was parsed and is answered in HTTP/1.1; nothing after it is read.
            self._refusing = True
            self._close_after = True
            if self._task is None and not self._queue:
                self.transport.close()
        except httptools.HttpParserError as e:
            self._refuse(400, f"malformed HTTP request: {e}")
        else:
            # httptools gathers a header's pieces itself: a head that never ends must be cut off here.
            if not self._in_body and self._head_pending > self._limits.max_head_bytes:
                self._refuse(431, f"request head larger than {self._limits.max_head_bytes} bytes")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self._queue.clear()
        if self._task is not None:
            self._task.cancel()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("the client went away"))

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._drain is not None:
            if not self._drain.done():
                self._drain.set_result(None)
            self._drain = None

    async def drained(self) -> None:
        if self._drain is None:
            self._drain = self.server.loop.create_future()
        await self._drain

    # ---- parser callbacks ----------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > self._limits.max_head_bytes:
            raise _Refused(431, f"request head larger than {self._limits.max_head_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self._limits.max_head_bytes:
            raise _Refused(431, f"request head larger than {self._limits.max_head_bytes} bytes")
        name = name.lower()
        prev = self._headers.get(name)
        self._headers[name] = value if prev is None else prev + b", " + value

    def on_headers_complete(self) -> None:
        limits = self._limits
        if self._head_bytes > limits.max_head_bytes:
            raise _Refused(431, f"request head larger than {limits.max_head_bytes} bytes")
        length = self._headers.get(b"content-length")
        if length is not None and int(length) > limits.max_body_bytes:  # llhttp has checked it is a number
            raise _Refused(413, f"request body of {int(length)} bytes exceeds the limit of "
                                f"{limits.max_body_bytes} bytes")
        self._in_body = True
        self._head_pending = 0
        expect = self._headers.get(b"expect")
        if expect is not None and expect.lower() == b"100-continue" and self.idle:
            # (behind a pipelined answer in progress it would land inside that answer; the client then
            # sends its body after its own short wait)
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._limits.max_body_bytes:
            raise _Refused(413, f"request body exceeds the limit of {self._limits.max_body_bytes} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self._parser
        chunks = self._body
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        path, _, query = self._url.partition(b"?")
        request = Request(parser.get_method(), path.decode("latin-1"), query, self._headers, body,
                          parser.should_keep_alive(), parser.get_http_version() != "1.0")
        self._url = b""
        self._headers = {}
        self._head_bytes = 0
        self._body = []
        self._body_bytes = 0
        self._in_body = False
        self._head_pending = 0
        if self._task is None and not self._queue:
            self._run(request)
            return
        self._queue.append(request)
        if len(self._queue) >= self._limits.max_pipelined and not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()

    # ---- answering -----------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return self._task is None and not self._queue

    def _run(self, request: Request) -> None:
        self._task = self.server.loop.create_task(self._respond(request))

    async def _respond(self, request: Request) -> None:
        writer = ResponseWriter(self, chunked=request.http11)
        try:
            response = await self.server.handler(request, writer)
        except Exception:
            logger.exception("unhandled error answering %s %s", request.method.decode(), request.path)
            response = None if writer.started else self.server.error_response(500, "internal router error")
        if self.closed:
            return
        keep_alive = request.keep_alive and not self._close_after
        if writer.started:
            # An unfinished stream (or a close-delimited one) cannot be followed by another answer.
            if not (keep_alive and writer.ended and writer.chunked):
                self.transport.close()
                return
        else:
            if response is None:
                logger.error("handler for %s %s returned no answer", request.method.decode(), request.path)
                response = self.server.error_response(500, "internal router error")
            self._write(response, keep_alive)
            if not keep_alive:
                self.transport.close()
                return
        self._task = None
        self._next()

    def _next(self) -> None:
        if not self._queue:
            if self._close_after:
                self.transport.close()
            return
        item = self._queue.popleft()
        if self._read_paused and len(self._queue) < self._limits.max_pipelined // 2:
            self._read_paused = False
            self.transport.resume_reading()
        if isinstance(item, Response):
            self._write_refusal(item)
        else:
            self._run(item)

    def _write(self, response: Response, keep_alive: bool) -> None:
        body = response.body
        parts = _head(response.status, response.content_type, response.headers, self.server.date_header, keep_alive)
        parts += (b"Content-Length: ", str(len(body)).encode(), b"\r\n\r\n")
        if len(body) <= _INLINE_BODY:
            parts.append(body)
            self.transport.write(b"".join(parts))
        else:
            self.transport.write(b"".join(parts))
            self.transport.write(body)

    def _refuse(self, status: int, message: str) -> None:
        """Answer a request that broke a limit (after any earlier requests' answers), then close."""
        self._refusing = True
        response = self.server.error_response(status, message)
        if self.idle:
            self._write_refusal(response)
        else:
            self._queue.append(response)

    def _write_refusal(self, response: Response) -> None:
        self._refusing = True
        self._write(response, keep_alive=False)
        self.server.loop.call_later(self._limits.linger_secs, self.transport.close)

    def close_when_idle(self) -> None:
        """Finish the request in progress, if any, then close (server shutdown)."""
        self._close_after = True
        self._queue.clear()
        if self._task is None:
            self.transport.close()

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.transport.close()

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task


class HttpServer:
    """Listens on one address and answers every request with `handler`; build it inside the running loop.

    `error_response(status, message)` builds the answers the server gives on its own (malformed or
    oversized requests, a handler that failed), so they share the application's error shape.
    """

    def __init__(self, handler: Handler, limits: ServerLimits, error_response: ErrorResponse) -> None:
        self.handler = handler
        self.limits = limits
        self.error_response = error_response
        self.connections: set[_Connection] = set()
        self.loop = asyncio.get_running_loop()
        self.now = 0.0
        self.date_header = b""
        self._server: asyncio.AbstractServer | None = None
        self._tick_handle: asyncio.TimerHandle | None = None

    async def start(self, host: str, port: int) -> None:
        self._tick()
        self._server = await self.loop.create_server(lambda: _Connection(self), host, port, reuse_address=True,
                                                     backlog=2048)

    def _tick(self) -> None:
        """Once a second: refresh the Date header and the coarse clock, close idle connections."""
        loop = self.loop
        self.now = loop.time()
        self.date_header = b"Date: " + formatdate(usegmt=True).encode() + b"\r\n"
        cutoff = self.now - self.limits.idle_timeout_secs
        for conn in [c for c in self.connections if c.idle and c.last_input < cutoff]:
            conn.transport.close()
        self._tick_handle = loop.call_later(1.0, self._tick)

    async def stop(self, grace_secs: float) -> None:
        """Stop listening, let requests in progress finish for up to `grace_secs`, then cut the rest."""
        if self._server is not None:
            self._server.close()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        for conn in list(self.connections):
            conn.close_when_idle()
        busy = {c.task for c in self.connections if c.task is not None}
        if busy:
            await asyncio.wait(busy, timeout=grace_secs)
        for conn in list(self.connections):
            conn.cancel()
