"""A whole PD cluster on this machine for the end-to-end tests: `python -m tpla_serve.launch --role all`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from tpla_serve.net import free_port

HOST = "127.0.0.1"



def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with code {proc.returncode} while starting")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} was not healthy within {timeout} s")


class Cluster:
    """Router + prefill server (T=1) + decode server (T=2, g=2) on free ports, started by --role all."""

    def __init__(self, model_path: str, decode_args: str = "") -> None:
        self.port, self.prefill_port, self.decode_port, self.bootstrap_port = (free_port() for _ in range(4))
        cmd = [
            sys.executable, "-m", "tpla_serve.launch", "--role", "all", "--model-path", model_path,
            "--host", HOST, "--port", str(self.port), "--prefill-port", str(self.prefill_port),
            "--decode-port", str(self.decode_port), "--disaggregation-bootstrap-port", str(self.bootstrap_port),
            "--prefill-args", "--kv-cache-bytes 67108864 --disaggregation-timeout 20 --enable-metrics",
            "--decode-args", f"--kv-cache-bytes 67108864 --disaggregation-timeout 20 --enable-metrics {decode_args}",
            "--log-level", "warning",
        ]
        self.proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
        wait_healthy(self.url, self.proc)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def prefill_url(self) -> str:
        return f"http://{HOST}:{self.prefill_port}"

    @property
    def decode_url(self) -> str:
        return f"http://{HOST}:{self.decode_port}"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
