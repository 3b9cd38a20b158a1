"""What a server's scheduler loop asks of its PD side (prefill or decode), whichever it is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from tpla_serve.engine.request import Request, RequestSpec


# The err_type of a request whose KV transfer failed: its answer is a 503 that a router retries elsewhere.
KV_TRANSFER_FAILED = "kv_transfer_failed"


class ServerBusy(Exception):
    """A request this server cannot take now (a bounded queue is full): a 503, retryable elsewhere."""


@dataclass(frozen=True)
class Bootstrap:
    """The PD fields the router adds to a request (DESIGN §4): where the prefill is, and the room."""

    host: str
    port: int | None  # the prefill's bootstrap port; None: the decode's --disaggregation-bootstrap-port
    room: int


class PDRole(Protocol):
    @property
    def has_work(self) -> bool:
        """Rooms in flight that the loop must keep polling for."""
        ...

    def add(self, spec: RequestSpec, bootstrap: Bootstrap) -> list[Request]:
        """Take a request that carries a bootstrap room; returns the requests that are already done.
        Bad input raises ValueError (nothing is kept)."""
        ...

    def poll(self) -> list[Request]:
        """Requests whose room changed state (ready to decode, or ended by a failed transfer)."""
        ...

    def after_step(self, updated: list[Request]) -> None:
        """Called with the requests a scheduler step changed."""
        ...

    def abort(self, rid: str, message: str) -> list[Request]:
        """End a request's room; returns the requests that ended here (not in the scheduler)."""
        ...

    def fileno(self) -> int:
        """A descriptor that is readable while poll() has something (for the scheduler loop's poller)."""
        ...

    def stats(self) -> dict[str, Any]: ...

    def close(self) -> None: ...
