"""The Ray actor behind every process of a cluster: one `python -m tpla_serve.launch` on its node.

The actor holds its node's resources (its placement-group bundle) and runs the server, one node of a
multi-node server, or the router as a child process in a session of its own. The child is told to stop
when the actor dies (Linux's parent-death signal), so a killed or restarted actor leaves no server behind;
Ray restarts the actor on the same bundle, and the cluster starts the child again.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from tpla_serve.net import free_port

_PR_SET_PDEATHSIG = 1
PORT_WAIT_S = 30.0  # a restarted child waits this long for its predecessor's ports
STOP_WAIT_S = 30.0


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the actor's process ends, however it ends."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class LaunchActor:
    """One launched process on one Ray node."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def address(self) -> str:
        """The node's address, which the other nodes and the router reach this process at."""
        import ray

        return ray.util.get_node_ip_address()

    def free_ports(self, count: int) -> list[int]:
        host = self.address()
        ports: list[int] = []
        while len(ports) < count:
            if (port := free_port(host)) not in ports:
                ports.append(port)
        return ports

    def start(self, argv: list[str], env: dict[str, str], ports: list[int]) -> int:
        """Start `python -m tpla_serve.launch argv` once `ports` are free (a predecessor may hold them a
        moment longer); returns the child's pid."""
        self.stop()
        host = self.address()
        deadline = time.monotonic() + PORT_WAIT_S
        while not all(_port_free(host, p) for p in ports):
            if time.monotonic() > deadline:
                raise RuntimeError(f"ports {ports} on {host} stayed busy for {PORT_WAIT_S:.0f} s")
            time.sleep(0.5)
        self.proc = subprocess.Popen([sys.executable, "-m", "tpla_serve.launch", *argv],
                                     env={**os.environ, **env}, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        return self.proc.pid

    def exit_code(self) -> int | None:
        """None while the child runs; its exit code once it ended (-1: never started, as after a restart)."""
        if self.proc is None:
            return -1
        return self.proc.poll()

    def healthy(self, url: str, api_key: str | None) -> bool:
        req = urllib.request.Request(url + "/health")
        if api_key:
            req.add_header("Authorization", f"Bearer {api_key}")
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """Stop the child and everything it started (its session), politely first."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
