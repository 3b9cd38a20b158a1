"""CPU a PD decode server burns while it has nothing to compute: idle, and while waiting for a prompt's KV.

    python benchmarks/bench_idle_cpu.py --seconds 60

Starts a decode server (`--role decode`, TP=2, g=2, the bundled model) and measures, from /proc, the CPU
time of each of its processes — the HTTP front, the scheduler (rank 0) and TP rank 1 — over --seconds of
(a) no requests at all and (b) requests whose KV never comes (their prefill server does not exist, so the
decode reserves pages, registers and waits until --disaggregation-timeout). Reported as % of one core.
A loop that polled while waiting would show here; blocking waits cost ~0.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from tpla_serve.net import free_port  # noqa: E402

HOST = "127.0.0.1"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def spawned(pid: int) -> list[int]:
    return [p for p in children(pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]


def sample(pids: dict[str, int], seconds: float) -> dict[str, float]:
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    time.sleep(seconds)
    return {name: (cpu_seconds(pid) - before[name]) / seconds * 100 for name, pid in pids.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    port = free_port()
    cmd = [sys.executable, "-m", "tpla_serve.launch", "--role", "decode", "--host", HOST, "--port", str(port),
           "--tp-size", "2", "--tpla-groups", "2", "--kv-cache-bytes", str(64 << 20),
           "--disaggregation-timeout", str(args.seconds + 30), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://{HOST}:{port}"
    try:
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                raise SystemExit("the decode server did not start")
            time.sleep(0.5)
        (scheduler,) = spawned(proc.pid)
        (rank1,) = spawned(scheduler)
        pids = {"HTTP front": proc.pid, "scheduler (TP rank 0)": scheduler, "TP rank 1": rank1}
        time.sleep(5)  # start-up work settles
        idle = sample(pids, args.seconds)
        body = {"input_ids": [[5, 6, 7, 8]] * 8, "sampling_params": {"max_new_tokens": 4},
                "bootstrap_host": [HOST] * 8, "bootstrap_port": [free_port()] * 8,
                "bootstrap_room": random.sample(range(1, 1 << 62), 8)}
        waiting = threading.Thread(target=lambda: httpx.post(url + "/generate", json=body, timeout=args.seconds + 60))
        waiting.start()
        time.sleep(2)  # rooms reserved, registered, every rank expecting them
        kv_wait = sample(pids, args.seconds)
    finally:
        proc.terminate()
        proc.wait(60)
    lines = ["| process | idle, % of a core | waiting for 8 rooms' KV, % of a core |", "|---|---|---|"]
    lines += [f"| {name} | {idle[name]:.2f} | {kv_wait[name]:.2f} |" for name in pids]
    text = "\n".join([
        f"`python benchmarks/bench_idle_cpu.py --seconds {args.seconds:g}`: " + __doc__.split("\n\n")[2]
        .replace("\n", " "), "", *lines])
    print(write_result("idle_cpu", "CPU of an idle PD decode server (TP=2)", text))
    print(text)


if __name__ == "__main__":
    main()
