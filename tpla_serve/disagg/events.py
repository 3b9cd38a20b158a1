"""Room outcomes the transport reports to its engine, by callback or by poll()."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from tpla_serve.disagg.messages import PromptLogprobs

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


@dataclass(frozen=True)
class RoomFailed:
    """The room is over without KV: the request must end with an abort carrying `message`."""

    room: int
    message: str


RoomEvent = RoomCompleted | RoomFailed


class EventSink:
    """Delivers events to a callback (run on the transport's IO thread) or queues them for poll()."""

    def __init__(self, callback: Callable[[RoomEvent], None] | None) -> None:
        self._callback = callback
        self._queue: deque[RoomEvent] = deque()
        self._lock = threading.Lock()

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

    def poll(self) -> list[RoomEvent]:
        with self._lock:
            events = list(self._queue)
            self._queue.clear()
        return events
