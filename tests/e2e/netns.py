"""Hosts for multi-node tests: Linux network namespaces on one bridge, each with its own address.

`Hosts(["a", "b"])` makes a hub namespace holding a bridge, one namespace per host with a veth into the
bridge, and a veth from the test's own namespace so the test can reach every host; everything is removed
on close. Needs root and iproute2 (`ip netns`); `unavailable()` says why a machine cannot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux-only"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"tplprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as e:
        return f"the kernel refuses network namespaces here (`ip netns add`: {e.stderr.strip()})"
    _ip("netns", "del", probe)
    return None


class Hosts:
    """Named hosts on the subnet 10.<x>.<y>.0/24 (from the test's pid); the test itself is .254."""

    def __init__(self, names: list[str]) -> None:
        tag = os.getpid() % 100000
        octets = f"10.{200 + tag % 50}.{tag % 250}"
        self.hub = f"tplhub{tag}"
        self.client_link = f"tplc{tag}"
        self.client_address = f"{octets}.254"
        self.namespaces = {name: f"tpl{tag}{name}" for name in names}
        self.addresses = {name: f"{octets}.{i + 1}" for i, name in enumerate(names)}
        self._made: list[str] = []
        try:
            self._make()
        except BaseException:
            self.close()
            raise

    def _make(self) -> None:
        _ip("netns", "add", self.hub)
        self._made.append(self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for i, (name, ns) in enumerate(self.namespaces.items()):
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p{i}", "netns",
                self.hub)
            self._attach(f"p{i}")
            _ip("-n", ns, "addr", "add", f"{self.addresses[name]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", self.client_link, "type", "veth", "peer", "name", "pc", "netns", self.hub)
        self._attach("pc")
        _ip("addr", "add", f"{self.client_address}/24", "dev", self.client_link)
        _ip("link", "set", self.client_link, "up")

    def _attach(self, port: str) -> None:
        _ip("-n", self.hub, "link", "set", port, "master", "br0")
        _ip("-n", self.hub, "link", "set", port, "up")

    def command(self, name: str, argv: list[str]) -> list[str]:
        """`argv` run on host `name`."""
        return ["ip", "netns", "exec", self.namespaces[name], *argv]

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.client_link], capture_output=True)
        for ns in reversed(self._made):  # deleting a namespace removes its end of every veth
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()
