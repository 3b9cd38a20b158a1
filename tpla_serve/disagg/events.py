"""Room outcomes the transport reports to its engine, by callback or by poll()."""

from __future__ import annotations

import logging
import select
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from tpla_serve.disagg.io_loop import IOLoop
from tpla_serve.disagg.messages import PromptLogprobs, TopLogprobs
from tpla_serve.disagg.waker import Waker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoomCompleted:
    """Every layer of the room arrived on this rank and DONE followed: the request may start decoding."""

    room: int
    first_token_id: int
    first_token_logprob: float | None
    prompt_logprobs: PromptLogprobs | None  # rank 0 only, when the request asked for them
    nbytes: int  # KV bytes this rank received for the room, draft included
    seconds: float  # from the first KV message to DONE
    draft_kv: bool = False  # this rank received the draft model's KV too
    draft_nbytes: int = 0  # of nbytes, the draft's
    first_token_top: TopLogprobs | None = None  # rank 0 only, when the request asked for top logprobs


@dataclass(frozen=True)
class RoomFailed:
    """The room is over without KV: the request must end with an abort carrying `message`."""

    room: int
    message: str


RoomEvent = RoomCompleted | RoomFailed


class EventSink:
    """Delivers events to a callback (run on the transport's IO thread) or queues them for poll().

    A queued event also writes a byte to a pipe, so an engine can block on `fileno()` in its own poller
    (or in poll(timeout_s)) until something happens, instead of waking up to check.
    """

    def __init__(self, callback: Callable[[RoomEvent], None] | None) -> None:
        self._callback = callback
        self._queue: deque[RoomEvent] = deque()
        self._lock = threading.Lock()
        self._waker: Waker | None = Waker()

    def fileno(self) -> int:
        """Readable while events are queued."""
        assert self._waker is not None, "the transport is closed"
        return self._waker.fileno()

    def emit(self, events: list[RoomEvent]) -> None:
        if self._callback is not None:
            for event in events:
                try:
                    self._callback(event)
                except Exception:  # the engine's bug must not stop the transport
                    logger.exception("event callback failed for %s", event)
            return
        with self._lock:
            self._queue.extend(events)
        if self._waker is not None:
            self._waker.wake()

    def poll(self, timeout_s: float = 0.0) -> list[RoomEvent]:
        """The queued events; with timeout_s > 0, waits up to that long for the first one."""
        if self._waker is not None:
            if timeout_s > 0 and not self._queue:
                select.select([self._waker], [], [], timeout_s)
            self._waker.drain()
        with self._lock:
            events = list(self._queue)
            self._queue.clear()
        return events

    def close(self) -> None:
        """Once the transport's IO thread has stopped (nothing emits any more)."""
        if self._waker is not None:
            self._waker.close()
            self._waker = None


class TransportLoop(IOLoop):
    """An IO loop that reports room outcomes to its engine through an EventSink: by callback, or by poll()
    with fileno() for the engine's own poller."""

    def __init__(self, name: str, on_event: Callable[[RoomEvent], None] | None) -> None:
        super().__init__(name=name)
        self._events = EventSink(on_event)

    def poll(self, timeout_s: float = 0.0) -> list[RoomEvent]:
        """Events since the last poll (when no on_event callback was given); with timeout_s > 0, waits up
        to that long for the first."""
        return self._events.poll(timeout_s)

    def fileno(self) -> int:
        """Readable while events wait for poll()."""
        return self._events.fileno()

    def close(self, timeout_s: float = 5.0) -> None:
        super().close(timeout_s)
        self._events.close()
