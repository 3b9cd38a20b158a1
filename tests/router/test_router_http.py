"""The router's own HTTP/1.1 layer over raw sockets: pipelining, HTTP/1.0, malformed input, wrong routes."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest
from router_procs import HOST, RouterProcess, Workers, router_args


@pytest.fixture(scope="module")
def router(module_workers: Workers) -> Iterator[RouterProcess]:
    r = RouterProcess(router_args(module_workers.prefill, module_workers.decode, "--disable-health-check"))
    yield r
    r.stop()


class Answers:
    """Reads HTTP/1.1 answers (Content-Length or chunked) one after another from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = b""

    def _fill(self) -> None:
        data = self._sock.recv(65536)
        if not data:
            raise EOFError("connection closed")
        self._buf += data

    def _line(self) -> bytes:
        while b"\r\n" not in self._buf:
            self._fill()
        line, self._buf = self._buf.split(b"\r\n", 1)
        return line

    def _take(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._fill()
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def next(self) -> tuple[int, dict[bytes, bytes], bytes]:
        status = int(self._line().split(b" ", 2)[1])
        headers = {}
        while line := self._line():
            name, _, value = line.partition(b": ")
            headers[name.lower()] = value
        if b"content-length" in headers:
            return status, headers, self._take(int(headers[b"content-length"]))
        body = b""
        while size := int(self._line(), 16):
            body += self._take(size)
            self._take(2)
        self._take(2)
        return status, headers, body

    def closed(self) -> bool:
        try:
            self._fill()
        except EOFError:
            return True
        return False


def connect(router: RouterProcess) -> tuple[socket.socket, Answers]:
    sock = socket.create_connection((HOST, router.port), timeout=10)
    return sock, Answers(sock)


def post(path: bytes, body: dict[str, object], extra: bytes = b"") -> bytes:
    raw = json.dumps(body).encode()
    return (b"POST %s HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (path, len(raw), extra, raw))


def test_pipelined_requests_are_answered_in_order(router: RouterProcess, workers: Workers) -> None:
    sock, answers = connect(router)
    with sock:
        sock.sendall(post(b"/generate", {"text": "first", "rid": "one"})
                     + b"GET /health HTTP/1.1\r\nHost: r\r\n\r\n"
                     + post(b"/generate", {"text": "third", "rid": "three", "stream": True})
                     + post(b"/generate", {"text": "fourth", "rid": "four"}, b"Connection: close\r\n"))
        status, _, body = answers.next()
        assert status == 200 and json.loads(body)["meta_info"]["id"] == "one"
        status, _, body = answers.next()
        assert status == 200 and json.loads(body)["status"] == "ok"
        status, headers, body = answers.next()
        assert status == 200 and headers[b"content-type"] == b"text/event-stream"
        assert body.endswith(b"data: [DONE]\n\n")
        status, headers, body = answers.next()
        assert status == 200 and json.loads(body)["meta_info"]["id"] == "four"
        assert headers[b"connection"] == b"close" and answers.closed()


def test_http_10_client_gets_a_close_delimited_stream(router: RouterProcess, workers: Workers) -> None:
    raw = json.dumps({"text": "old client", "stream": True}).encode()
    sock, _ = connect(router)
    with sock:
        sock.sendall(b"POST /generate HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(raw), raw))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding" not in head.lower()
    assert body.count(b"data: ") == 4 and body.endswith(b"data: [DONE]\n\n")


def test_malformed_requests_and_wrong_routes(router: RouterProcess, workers: Workers) -> None:
    sock, answers = connect(router)
    with sock:
        sock.sendall(b"GET /nowhere HTTP/1.1\r\nHost: r\r\n\r\nGET /generate HTTP/1.1\r\nHost: r\r\n\r\n")
        status, _, body = answers.next()
        assert status == 404 and json.loads(body)["error"]["message"] == "no route /nowhere"
        status, headers, body = answers.next()
        assert status == 405 and headers[b"allow"] == b"POST"
        sock.sendall(b"BR\x00KEN / HTTP/1.1\r\n\r\n")
        status, headers, body = answers.next()
        assert status == 400 and "malformed HTTP request" in json.loads(body)["error"]["message"]
        assert headers[b"connection"] == b"close"
    assert all(w.requests() == [] for w in workers.all)
