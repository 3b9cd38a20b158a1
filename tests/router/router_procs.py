"""Real processes for router tests and benchmarks: stub workers and routers on loopback ports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

STUB = Path(__file__).with_name("stub_worker.py")
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


class StubWorker:
    """One stub_worker.py process; `kill()` then `start()` brings it back on the same port."""

    def __init__(self, role: str, port: int = 0, wait: bool = True, quiet: bool = False) -> None:
        self.role = role
        self.port = port
        self.quiet = quiet
        self.proc: subprocess.Popen[str] | None = None
        self.client = httpx.Client(timeout=10)
        self.launch()
        if wait:
            self.wait_ready()

    @classmethod
    def many(cls, roles: list[str], quiet: bool = False) -> list[StubWorker]:
        """Start several stubs in parallel (process start-up dominates test time)."""
        stubs = [cls(role, wait=False, quiet=quiet) for role in roles]
        for stub in stubs:
            stub.wait_ready()
        return stubs

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def launch(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(STUB), "--role", self.role, "--host", HOST, "--port", str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL if self.quiet else None, text=True, env=_env())

    def wait_ready(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"stub {self.role} exited with {self.proc.wait()}")
        self.port = json.loads(line)["port"]

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self.client.close()

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        r = self.client.request(method, self.url + path, json=body)
        r.raise_for_status()
        return r.json() if r.headers.get("content-type", "").startswith("application/json") else None

    def configure(self, **behaviour: Any) -> None:
        self._call("POST", "/stub/config", behaviour)

    def reset(self) -> None:
        self._call("POST", "/stub/reset")

    def release(self) -> None:
        self._call("POST", "/stub/release")

    def requests(self) -> list[dict[str, Any]]:
        return self._call("GET", "/stub/requests")

    def aborts(self) -> list[dict[str, Any]]:
        return self._call("GET", "/stub/aborts")["aborts"]

    def flushes(self) -> int:
        return self._call("GET", "/stub/aborts")["flushes"]


@dataclass
class Workers:
    prefill: list[StubWorker]
    decode: list[StubWorker]

    @property
    def all(self) -> list[StubWorker]:
        return self.prefill + self.decode


class RouterProcess:
    """`python -m <module>` with router flags, on a free loopback port, until `stop()`."""

    def __init__(self, args: list[str], module: str = "tpla_router", port_flag: str = "--port",
                 ready_path: str = "/health", startup_timeout: float = 20.0,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"router-{self.port}.log"
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--host", HOST, port_flag, str(self.port), *args],
            stdout=self._log_file, stderr=subprocess.STDOUT, env={**_env(), **(env or {})})
        deadline = time.monotonic() + startup_timeout
        probe = httpx.Client(timeout=1)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{module} exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                probe.get(self.url + ready_path)
                probe.close()
                return
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    probe.close()
                    self.stop()
                    raise RuntimeError(f"{module} did not start:\n{self.log.read_text()}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()


def router_args(prefills: list[StubWorker], decodes: list[StubWorker], *extra: str,
                bootstrap_port: int | None = 8998) -> list[str]:
    args: list[str] = []
    for p in prefills:
        args += ["--prefill", p.url] + ([str(bootstrap_port)] if bootstrap_port is not None else [])
    for d in decodes:
        args += ["--decode", d.url]
    return args + list(extra)


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    """Poll until `predicate()` is truthy; the timeout only bounds a failing test."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
