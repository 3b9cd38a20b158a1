"""Whether the other end of a control socket is still there (DESIGN §7).

Rank 0 holds one PUSH socket per other rank and every rank one PULL socket from rank 0: a TCP connection
each, so a peer whose process ends (the kernel closes the connection) shows up as a disconnect on the
socket's monitor. A server spanning hosts adds ZMTP heartbeats, so a host that stops answering (no
heartbeat within HEARTBEAT_TIMEOUT_MS) does too: across hosts that is the only sign a rank has, a parent
process or a local exit code is not there. On one host a stopped (not dead) rank is left to the
scheduler's watchdog.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

logger = logging.getLogger(__name__)

HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 4000
WATCH_POLL_MS = 500
LOST_GRACE_S = 2.0  # the scheduler's own loop reports a loss it can see; the watch steps in after this


def enable_heartbeats(sock: zmq.Socket) -> None:
    """Ping the peer every second; a connection silent for HEARTBEAT_TIMEOUT_MS is dropped."""
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)


class Disconnects:
    """The disconnections a socket saw, read from its monitor without blocking (one thread reads it)."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.seen = False

    def check(self) -> bool:
        """Whether the peer has disconnected, now or before (a connection, once lost, stays lost)."""
        while not self.seen and self.monitor.poll(0):
            if recv_monitor_message(self.monitor)["event"] == zmq.EVENT_DISCONNECTED:
                self.seen = True
        return self.seen

    def close(self) -> None:
        self.monitor.close(0)


class PeerWatch:
    """Rank 0's watch over the other ranks' connections, on a thread of its own.

    The first rank that disconnects is remembered (`lost`, read by the scheduler loop between steps). A
    step blocked in a collective with a peer on a silent host cannot read it; when the loss is still not
    handled LOST_GRACE_S later, `on_lost` is called from the watch thread (the scheduler process then
    tells its front and stops).
    """

    def __init__(self, sockets: list[zmq.Socket], names: list[str]) -> None:
        self._watched = [Disconnects(s) for s in sockets]
        self._names = names
        self._stop = threading.Event()
        self.lost: str | None = None
        self.on_lost: Callable[[str], None] | None = None
        self._thread = threading.Thread(target=self._run, name="tp-peer-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.wait(WATCH_POLL_MS / 1000):
                gone = [name for name, d in zip(self._names, self._watched) if d.check()]
                if gone:
                    self.lost = (f"{', '.join(gone)} disconnected from rank 0: its process or its host is "
                                 f"gone (no heartbeat within {HEARTBEAT_TIMEOUT_MS / 1000:g} s, or the "
                                 "connection closed)")
                    logger.error("%s", self.lost)
                    if not self._stop.wait(LOST_GRACE_S) and self.on_lost is not None:
                        self.on_lost(self.lost)
                    return
        finally:
            for d in self._watched:
                d.close()

    def stop(self) -> None:
        """Stop watching (before the ranks are told to leave: their goodbye is not a loss)."""
        self._stop.set()
        self._thread.join()
