"""Addresses, ports and interfaces shared by the servers, the clusters and the TP group."""

from __future__ import annotations

import ipaddress
import socket
import struct

_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) is this machine's loopback, unreachable from other hosts."""
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def route_address(host: str, port: int) -> str:
    """The local address this machine reaches host:port from: what its peers on that network reach it at.
    A UDP connect only picks the route; no packet is sent."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        return s.getsockname()[0]


def interface_of(address: str) -> str | None:
    """The name of the network interface holding IPv4 `address` (Linux), or None when none does."""
    import fcntl

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # an interface without an IPv4 address
                continue
            if socket.inet_ntoa(raw[20:24]) == address:
                return name
    return None
