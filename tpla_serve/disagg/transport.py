"""The KV data plane: how a KVSender's messages reach a decode rank's pages (DESIGN §8).

A data plane moves already-encoded messages (a msgpack header, its tag, raw payload frames) from the
prefill to a decode rank's endpoint, and on the decode side asks the receiver, from the header alone,
where each payload byte goes, so bytes land in their final buffer. Everything above it (rooms,
authentication, limits, chunking) is the transport's and the same for every plane. TCP (tcp_stream.py)
runs anywhere; an RDMA engine (NIXL, Mooncake) would implement the same two halves; LoopbackPlane
(loopback.py) moves bytes inside one process for tests.

Rules every plane keeps: messages on one (endpoint, lane) arrive in the order sent; a message is handed to
the sink whole or not at all, apart from `abandon` when the link breaks mid-payload; `on_done` runs exactly
once per message sent, after which its frames are no longer read; the sink's landing lock is held while
bytes are written into a landing, never while waiting for the network.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tpla_serve.disagg.wire import Frame

SendDone = Callable[[str | None], None]
"""on_done(error): the message went out (None) or could not (why); its frames may be reused now."""


@dataclass
class Landing:
    """Where one received message's payload goes: writable byte views filled in order, whose sizes add up
    to the payload's. Bytes for a landing that is no longer `live` (its room ended) are read and dropped."""

    segments: list[memoryview] = field(default_factory=list)
    lock: threading.Lock | None = None  # held while bytes go into segments: a room's cancel waits on it
    live: Callable[[], bool] = lambda: True
    finish: Callable[[], None] = lambda: None  # every payload byte has landed
    abandon: Callable[[str], None] = lambda reason: None  # the link broke before it had

    @staticmethod
    def discard() -> Landing:
        """A landing that drops the payload (a message for no room this rank expects)."""
        return Landing(live=lambda: False)


class StreamSink(Protocol):
    """The decode rank's side of a data plane: what to do with each message a peer sends."""

    def land(self, header: memoryview, tag: memoryview, sizes: Sequence[int]) -> Landing:
        """Where the payload frames of `sizes` bytes go. The plane has already checked the header's size
        and every frame's against its limits; a bad or unauthenticated header gets a discarding landing."""
        ...


class DataSender(Protocol):
    """The prefill's side of a data plane; only the sender's IO thread calls it."""

    max_connections: int

    def send(
        self, endpoint: str, lane: int, room: int, frames: Sequence[Frame], on_done: SendDone,
        prepare: Callable[[], None] | None = None,
    ) -> None:
        """Queue one message for `endpoint` behind those queued on the same lane; returns at once.
        prepare() fills its frames (a slice copied into staging) on the plane's thread, just before they
        go out. Raises ConnectionLimit when opening it would pass the plane's connection limit."""
        ...

    def drop_room(self, room: int) -> None:
        """Forget the room's messages that have not started going out (their on_done gets an error)."""
        ...

    def sweep(self, idle_s: float, keep: set[str]) -> None:
        """Close idle connections to endpoints not in `keep`."""
        ...

    def connections(self) -> int:
        """Connections open now (at most max_connections)."""
        ...

    def is_open(self, endpoint: str) -> bool:
        ...

    def close(self) -> None:
        ...


class DataListener(Protocol):
    endpoint: str  # what REGISTER names as this rank's endpoint
    refused: int  # envelopes or connections past a limit, dropped

    def connections(self) -> int:
        ...

    def close(self) -> None:
        ...


class DataPlane(Protocol):
    """Makes both halves: a sender for a KVSender, a listener bound for each KVReceiver."""

    def sender(self, timeout_s: float, max_connections: int) -> DataSender:
        ...

    def listen(
        self, host: str, port: int, advertise_host: str | None, sink: StreamSink, max_connections: int,
        max_frame_bytes: int, idle_timeout_s: float,
    ) -> DataListener:
        ...


class ConnectionLimit(Exception):
    """Sending would open one connection more than the transport allows."""
