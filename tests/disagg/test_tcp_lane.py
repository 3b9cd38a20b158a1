"""The TCP data plane's lane writes each message as soon as it is prepared: a message whose preparation
blocks (a GPU copy still running) holds back only itself and what queues behind it, never a message queued
before it; messages that need no preparing share the write of the one before. Real sockets on loopback;
the preparation is a function the test releases by hand (standing in for a GPU copy, which this machine
cannot run)."""

from __future__ import annotations

import threading

from kv_stream_helpers import StreamTap

from tpla_serve.disagg.tcp_stream import TcpSender


def _frames(name: str) -> list[bytes]:
    return [name.encode(), bytes(16), name.encode() * 100]


def test_a_message_waiting_for_its_preparation_does_not_hold_back_the_one_before(closing: list) -> None:
    tap = StreamTap(closing)
    out = TcpSender(timeout_s=5.0, max_connections=4)
    closing.append(out)
    first_copy, slow_copy = threading.Event(), threading.Event()
    done: list[tuple[str, str | None]] = []

    def on_done(name: str):
        return lambda error: done.append((name, error))

    # "gate" keeps the lane busy until the rest is queued, so the lane takes them as one batch.
    out.send(tap.endpoint, 0, 1, _frames("gate"), on_done("gate"), prepare=lambda: first_copy.wait(5))
    out.send(tap.endpoint, 0, 1, _frames("ready"), on_done("ready"))
    out.send(tap.endpoint, 0, 1, _frames("copying"), on_done("copying"), prepare=lambda: slow_copy.wait(5))
    out.send(tap.endpoint, 0, 1, _frames("done"), on_done("done"))
    first_copy.set()
    assert tap.recv_multipart()[0] == b"gate"
    assert tap.recv_multipart()[0] == b"ready"  # written while "copying" still waits for its copy
    assert not tap.poll(0.2)
    slow_copy.set()
    assert [tap.recv_multipart()[0] for _ in range(2)] == [b"copying", b"done"]
    assert done == [(name, None) for name in ("gate", "ready", "copying", "done")]
