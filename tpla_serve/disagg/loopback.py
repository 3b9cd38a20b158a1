"""A data plane inside one process (transport.py), for tests: each message is copied from the sender's
frames straight into the receiving sink's landing, on the sending thread, in order, with the same size
limits a real plane enforces. Its endpoints are names in the plane, not sockets."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

from tpla_serve.disagg.transport import ConnectionLimit, SendDone, StreamSink
from tpla_serve.disagg.wire import Frame


class LoopbackListener:
    def __init__(self, plane: LoopbackPlane, endpoint: str, sink: StreamSink, max_frame_bytes: int) -> None:
        self.plane, self.endpoint, self.sink, self.max_frame_bytes = plane, endpoint, sink, max_frame_bytes
        self.refused = 0
        self.closed = False

    def connections(self) -> int:
        return sum(1 for s in self.plane.senders for (e, _) in s.lanes if e == self.endpoint)

    def deliver(self, frames: Sequence[Frame]) -> None:
        views = [memoryview(f).cast("B") for f in frames]
        sizes = [v.nbytes for v in views[2:]]
        if any(s > self.max_frame_bytes for s in sizes):
            self.refused += 1
            return
        landing = self.sink.land(views[0], views[1], sizes)
        if sum(s.nbytes for s in landing.segments) != sum(sizes):
            landing.abandon("the landing does not match the payload's size")
            return
        payload = b"".join(views[2:]) if len(views) > 3 else (views[2] if len(views) == 3 else b"")
        offset = 0
        if landing.lock is not None:
            landing.lock.acquire()
        try:
            if not landing.live():
                return
            for seg in landing.segments:
                seg[:] = payload[offset : offset + seg.nbytes]
                offset += seg.nbytes
        finally:
            if landing.lock is not None:
                landing.lock.release()
        landing.finish()

    def close(self) -> None:
        self.closed = True
        self.plane.listeners.pop(self.endpoint, None)


class LoopbackSender:
    def __init__(self, plane: LoopbackPlane, max_connections: int) -> None:
        self.plane = plane
        self.max_connections = max_connections
        self.lanes: set[tuple[str, int]] = set()

    def send(
        self, endpoint: str, lane: int, room: int, frames: Sequence[Frame], on_done: SendDone,
        prepare: Callable[[], None] | None = None,
    ) -> None:
        if (endpoint, lane) not in self.lanes:
            if len(self.lanes) >= self.max_connections:
                raise ConnectionLimit(f"already has the {self.max_connections} connections it may open")
            self.lanes.add((endpoint, lane))
        listener = self.plane.listeners.get(endpoint)
        if listener is None:
            on_done(f"cannot send to {endpoint}: nothing listens there")
            return
        if prepare is not None:
            prepare()
        listener.deliver(frames)
        on_done(None)

    def drop_room(self, room: int) -> None:
        """Nothing waits: every message was delivered when sent."""

    def sweep(self, idle_s: float, keep: set[str]) -> None:
        self.lanes = {k for k in self.lanes if k[0] in keep}

    def connections(self) -> int:
        return len(self.lanes)

    def is_open(self, endpoint: str) -> bool:
        return (endpoint, 0) in self.lanes

    def close(self) -> None:
        self.lanes.clear()
        self.plane.senders.remove(self)


class LoopbackPlane:
    """One in-process network: the senders and listeners made by the same plane reach each other."""

    def __init__(self) -> None:
        self.listeners: dict[str, LoopbackListener] = {}
        self.senders: list[LoopbackSender] = []
        self._ports = itertools.count(1)

    def sender(self, timeout_s: float, max_connections: int) -> LoopbackSender:
        sender = LoopbackSender(self, max_connections)
        self.senders.append(sender)
        return sender

    def listen(
        self, host: str, port: int, advertise_host: str | None, sink: StreamSink, max_connections: int,
        max_frame_bytes: int, idle_timeout_s: float,
    ) -> LoopbackListener:
        endpoint = f"tcp://loopback:{next(self._ports)}"
        listener = self.listeners[endpoint] = LoopbackListener(self, endpoint, sink, max_frame_bytes)
        return listener
