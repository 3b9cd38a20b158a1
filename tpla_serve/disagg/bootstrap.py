"""ZMQ endpoint strings: building them from (host, port) and refusing ones a peer should not make us use.

A REGISTER names endpoints the prefill will connect to, so only plain `tcp://host:port` and `ipc://path`
addresses are accepted, never a bind wildcard or another transport.
"""

from __future__ import annotations

import re

MAX_ENDPOINT_LEN = 256
MAX_ROOM = 2**63 - 1

_TCP = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-_]+):([0-9]{1,5})")
_IPC = re.compile(r"ipc://[^\s*]+")


def tcp_endpoint(host: str, port: int) -> str:
    """`tcp://host:port`, bracketing IPv6 literals."""
    if not isinstance(host, str) or not host:
        raise ValueError(f"host must be a non-empty str, got {host!r}")
    if type(port) is not int or not 0 < port < 65536:
        raise ValueError(f"port must be an int in 1..65535, got {port!r}")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return check_endpoint(f"tcp://{host}:{port}")


def bootstrap_endpoint(host: str, port: int | None, default_port: int | None) -> str:
    """The prefill's bootstrap address from a request's bootstrap_host / bootstrap_port.

    The PD router may send a null bootstrap_port, meaning "the decode server's configured default".
    """
    if port is None:
        if default_port is None:
            raise ValueError("bootstrap_port is null and no default bootstrap port is configured")
        port = default_port
    return tcp_endpoint(host, port)


def check_endpoint(endpoint: str) -> str:
    """`endpoint` if it is a connectable tcp:// or ipc:// address, else ValueError."""
    if not isinstance(endpoint, str) or len(endpoint) > MAX_ENDPOINT_LEN:
        raise ValueError(f"endpoint must be a str of at most {MAX_ENDPOINT_LEN} characters")
    match = _TCP.fullmatch(endpoint)
    if match is not None:
        if not 0 < int(match.group(2)) < 65536:
            raise ValueError(f"endpoint {endpoint!r} has an invalid port")
        return endpoint
    if _IPC.fullmatch(endpoint) is not None:
        return endpoint
    raise ValueError(f"endpoint {endpoint!r} is not tcp://host:port or ipc://path")


def check_room(room: int) -> int:
    """`room` if it is a bootstrap room id (a 63-bit non-negative int), else ValueError."""
    if type(room) is not int or not 0 <= room <= MAX_ROOM:
        raise ValueError(f"bootstrap_room must be an int in [0, 2**63), got {room!r}")
    return room
