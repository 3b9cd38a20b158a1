"""The policy interface: pick one worker of a role for a request."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Protocol, TypeVar


class LoadedWorker(Protocol):
    """What a policy may read from a worker."""

    url: str
    in_flight: int


W = TypeVar("W", bound=LoadedWorker)


class Policy(ABC):
    """Selects among `workers`, which the caller guarantees to be a non-empty list of available workers.

    `key` is the request's routing text (prompt, chat transcript or token ids rendered as text), or None
    when the request carries none; only prefix-aware policies read it.
    """

    @abstractmethod
    def select(self, workers: Sequence[W], key: str | None) -> W: ...

    def on_worker_removed(self, url: str) -> None:
        """Forget per-worker state; called when a worker leaves its pool."""

    def maintain(self) -> None:
        """Periodic housekeeping (cache eviction); called from the router's background loop."""
