"""What every benchmark records beside its numbers (the date and the machine), and how the benchmarks that
need real servers start and stop them."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from tpla_serve.net import free_port

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def shown_path(path: str) -> str:
    """A path as result tables name it: relative to the repository when inside it."""
    root = RESULTS.parents[1]
    resolved = Path(path).resolve()
    return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else path


def machine_description() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}, torch {torch.__version__}"
    return f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} (CPU, {torch.get_num_threads()} threads)"


def write_result(name: str, title: str, body: str) -> Path:
    """Write benchmarks/results/<name>_<date>.md and return its path."""
    today = datetime.date.today().isoformat()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}_{today}.md"
    path.write_text(f"# {title}\n\nDate: {today}  \nMachine: {machine_description()}\n\n{body}\n")
    return path


SERVER_HOST = "127.0.0.1"


def launch_server(*args: str, timeout: float = 600.0) -> tuple[subprocess.Popen, str]:
    """`python -m tpla_serve.launch ARGS` on a free loopback port; returns once /health answers 200."""
    port = free_port()
    cmd = [sys.executable, "-m", "tpla_serve.launch", *args, "--host", SERVER_HOST, "--port", str(port),
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
    url = f"http://{SERVER_HOST}:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{shlex.join(cmd)} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(url)
        time.sleep(0.5)


def stop_servers(procs: list[subprocess.Popen]) -> None:
    """SIGTERM, newest first, then wait for each."""
    for proc in reversed(procs):
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.wait(60)
