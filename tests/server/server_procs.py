"""Real server processes for the HTTP tests: `python -m tpla_serve.launch --role decode ...` on free ports."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tpla_serve.net import free_port

HOST = "127.0.0.1"
API_KEY = "test-key"
MAX_BODY_BYTES = 64 << 10
# One chat template for the tiny test model, in the style of the bundled model's.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '# ' + message['role'] + ':\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '# assistant:\\n' }}{% endif %}"
)



def with_chat_template(model_dir: Path, dest: Path) -> Path:
    """A copy of a test model whose tokenizer has a chat template."""
    shutil.copytree(model_dir, dest)
    cfg_path = dest / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    return dest


def _ppids() -> dict[int, int]:
    """pid -> parent pid of every live (non-zombie) process, from /proc."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":
            out[int(entry.name)] = int(fields[1])
    return out


def scheduler_pid(front_pid: int) -> int:
    """The front's multiprocessing-spawned child (its other child is multiprocessing's resource tracker)."""
    for pid, ppid in _ppids().items():
        if ppid == front_pid and b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    raise LookupError(f"no scheduler process under pid {front_pid}")


def tp_rank_pids(scheduler: int) -> list[int]:
    """The scheduler's TP ranks > 0: its spawned children other than multiprocessing's resource tracker."""
    ranks = []
    for pid, ppid in _ppids().items():
        if ppid == scheduler:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
                ranks.append(pid)
    return ranks


def descendants(pid: int) -> set[int]:
    ppids = _ppids()
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, pp in ppids.items() if pp in frontier and p not in found}
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    live = _ppids()
    return {p for p in pids if p in live}


class ServerProcess:
    """One server (front + scheduler + TP ranks) started through the launch CLI."""

    def __init__(self, model_dir: Path, *extra: str, api_key: str | None = API_KEY) -> None:
        self.port = free_port()
        self.model_dir = model_dir
        self.api_key = api_key
        args = [sys.executable, "-m", "tpla_serve.launch", "--role", "decode", "--disaggregation-mode", "null",
                "--host", HOST,
                "--port", str(self.port), "--model-path", str(model_dir),
                "--kv-cache-bytes", str(32 << 20), "--log-level", "warning", *extra]
        if api_key is not None:
            args += ["--api-key", api_key]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(args, env=env)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.url, headers=self.headers, timeout=120)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def wait_healthy(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode} while starting")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"the server on port {self.port} was not healthy within {timeout} s")

    def stats(self) -> dict:
        r = self.client.get("/server_info")
        r.raise_for_status()
        return r.json()["internal_states"][0]

    def wait_idle(self, baseline_free: int, timeout: float = 30.0) -> dict:
        """Stats once nothing runs or waits and every page is back; the last stats on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            idle = s["num_running"] == 0 and s["num_waiting"] == 0 and s["pages_free"] == baseline_free
            if idle or time.monotonic() > deadline:
                return s
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
