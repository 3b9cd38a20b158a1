"""Soak test: a `--role all` cluster left idle, then under mixed traffic with faults injected.

Phases: the cluster starts (bundled model, decode TP=2 g=2), sits idle for --idle-minutes, then serves
--traffic-minutes of mixed traffic from several client threads — plain and streamed /generate, OpenAI
completions and chat, batches, logprobs — while a fault thread injects, in turn: clients that disconnect
mid-stream, /abort_request of running requests, bad bodies (malformed JSON, lone surrogates, oversized,
deep nesting, unknown fields), garbage on the prefill's bootstrap port, and killing the decode server's
TP rank 1 every --kill-every-s (the supervisor restarts that server; the router takes it out of rotation and
back; 5xx count as expected from the kill until a request is served again).

Reported: requests sent, answered per status class, lost (no HTTP answer at all: a hang or a dropped
connection outside a deliberate disconnect), 5xx outside the windows in which a server was deliberately
down, the cluster's summed RSS at the end of the idle phase and after the traffic has drained, and KV
pages still in use on each server at the end (leaked). Targets: 0 lost, 0 leaked, RSS growth < 5 %.

    python benchmarks/soak.py                      # 10 min idle, 30 min traffic
    python benchmarks/soak.py --idle-minutes 1 --traffic-minutes 3
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from tpla_serve.net import free_port  # noqa: E402

HOST = "127.0.0.1"
PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:", "for i in range(10):", "# sort a list\n"]


@dataclass
class Tally:
    """Outcomes of every request, shared by the client threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: int = 0
    status: Counter = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    unexpected_5xx: list[str] = field(default_factory=list)
    down_until: float = 0.0  # a server is deliberately down until then (plus the grace below)

    def record(self, what: str, status: int | None, started: float, error: str = "") -> None:
        with self.lock:
            self.sent += 1
            if status is None:
                if started > self.down_until:
                    self.lost.append(f"{what}: {error}")
                self.status["none (during a deliberate outage)" if started <= self.down_until else "none"] += 1
                return
            self.status[f"{status // 100}xx"] += 1
            if status >= 500 and started > self.down_until:
                self.unexpected_5xx.append(f"{what}: {status}")


def _proc_rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _parents() -> dict[int, int]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            out[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    return out


def _children(pid: int) -> list[int]:
    return [p for p, parent in _parents().items() if parent == pid]


def _tree(pid: int) -> set[int]:
    parents = _parents()
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for c, parent in parents.items():
            if parent == p and c not in found:
                found.add(c)
                todo.append(c)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def cluster_rss(root: int) -> int:
    return sum(_proc_rss(p) for p in _tree(root) | {root})


def pages_used(url: str) -> int:
    state = httpx.get(url + "/server_info", timeout=30).json()["internal_states"][0]
    return int(state["pages_used"])


def client_loop(router: str, tally: Tally, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=router, timeout=120) as client:
        while not stop.is_set():
            kind = rng.choice(["generate", "stream", "completions", "chat", "batch", "logprobs"])
            params = {"max_new_tokens": rng.randint(1, 48), "temperature": rng.choice([0.0, 0.7])}
            started = time.monotonic()
            try:
                if kind == "stream":
                    with client.stream("POST", "/generate", json={"text": rng.choice(PROMPTS), "stream": True,
                                                                  "sampling_params": params}) as r:
                        for _ in r.iter_lines():
                            pass
                        status = r.status_code
                elif kind == "completions":
                    status = client.post("/v1/completions", json={"model": "mla-tiny", "prompt": rng.choice(PROMPTS),
                                                                   "max_tokens": params["max_new_tokens"]}).status_code
                elif kind == "chat":
                    status = client.post("/v1/chat/completions", json={
                        "model": "mla-tiny", "max_tokens": params["max_new_tokens"],
                        "messages": [{"role": "user", "content": rng.choice(PROMPTS)}]}).status_code
                elif kind == "batch":
                    status = client.post("/generate", json={"text": rng.sample(PROMPTS, 3),
                                                            "sampling_params": params}).status_code
                else:
                    status = client.post("/generate", json={"text": rng.choice(PROMPTS), "sampling_params": params,
                                                            "return_logprob": kind == "logprobs"}).status_code
                tally.record(kind, status, started)
                failed = status >= 500
            except httpx.HTTPError as e:
                tally.record(kind, None, started, f"{type(e).__name__}: {e}")
                failed = True
            if failed:
                stop.wait(0.5)  # a client backs off after a failure rather than spinning on it


def _wait_served(router: str, timeout_s: float = 300.0) -> float:
    """Seconds until a request through the router is answered 200 again (after a deliberate outage)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            r = httpx.post(router + "/generate", timeout=30, json={"text": PROMPTS[0],
                                                                 "sampling_params": {"max_new_tokens": 2}})
            if r.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    return time.monotonic() - start


def fault_loop(router: str, cluster_pid: int, bootstrap_port: int, tally: Tally, stop: threading.Event,
               every_s: float, kill_every_s: float, log: list[str], outages: list[float]) -> None:
    """Every every_s one of the light faults in turn; every kill_every_s, TP rank 1 of the decode server dies
    (an outage: 5xx are expected from then until a request is served again)."""
    faults = ["disconnect", "abort", "bad_body", "bootstrap_garbage"]
    i = 0
    next_kill = time.monotonic() + kill_every_s / 2
    while not stop.wait(every_s):
        fault = "kill_decode_rank" if time.monotonic() >= next_kill else faults[i % len(faults)]
        i += 1
        started = time.monotonic()
        try:
            if fault == "disconnect":
                with httpx.Client(base_url=router, timeout=30) as c, c.stream(
                    "POST", "/generate", json={"text": PROMPTS[0], "stream": True,
                                               "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}
                ) as r:
                    next(r.iter_lines(), None)  # then drop the connection mid-stream
            elif fault == "abort":
                rid = f"soak-abort-{i}"
                long_request = {"text": PROMPTS[1], "rid": rid,
                                "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}
                t = threading.Thread(target=httpx.post, args=(router + "/generate",),
                                     kwargs={"json": long_request, "timeout": 60})
                t.start()
                time.sleep(0.3)
                httpx.post(router + "/abort_request", json={"rid": rid}, timeout=30)
                t.join(60)
            elif fault == "bad_body":
                for body in (b'{"text": ', b'{"text": "\\ud800"}', b"[" * 30_000 + b"]" * 30_000,
                             b'{"text": "a", "sampling_params": {"temprature": 1}}', b"x" * (33 << 20)):
                    r = httpx.post(router + "/generate", content=body, timeout=60,
                                   headers={"Content-Type": "application/json"})
                    tally.record("bad_body", r.status_code if r.status_code >= 500 else 400, started)
            elif fault == "bootstrap_garbage":
                with socket.create_connection((HOST, bootstrap_port), timeout=5) as s:
                    s.sendall(os.urandom(4096))
            elif fault == "kill_decode_rank":
                # the decode front's scheduler process, then its spawned child: TP rank 1
                front = next(p for p in _children(cluster_pid) if "--role decode" in _cmdline(p))
                scheduler = next(p for p in _children(front) if "spawn_main" in _cmdline(p))
                rank = next(p for p in _children(scheduler) if "spawn_main" in _cmdline(p))
                with tally.lock:
                    tally.down_until = float("inf")
                os.kill(rank, signal.SIGKILL)
                outages.append(_wait_served(router))
                with tally.lock:
                    tally.down_until = time.monotonic()
                next_kill = time.monotonic() + kill_every_s
            log.append(f"{time.strftime('%H:%M:%S')} {fault}")
        except (httpx.HTTPError, OSError, StopIteration) as e:
            log.append(f"{time.strftime('%H:%M:%S')} {fault}: {type(e).__name__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle-minutes", type=float, default=10.0)
    parser.add_argument("--traffic-minutes", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--fault-every-s", type=float, default=20.0)
    parser.add_argument("--kill-every-s", type=float, default=600.0, help="how often the decode's TP rank dies")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()

    port, bootstrap = free_port(), free_port()
    log_path = Path(f"/tmp/soak-{os.getpid()}.log")
    cmd = [sys.executable, "-m", "tpla_serve.launch", "--role", "all", "--host", HOST, "--port", str(port),
           "--disaggregation-bootstrap-port", str(bootstrap), "--log-level", "warning"]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    router = f"http://{HOST}:{port}"
    try:
        while not re.search(r"ready at", log_path.read_text()):
            if proc.poll() is not None:
                raise SystemExit("the cluster did not start:\n" + log_path.read_text()[-2000:])
            time.sleep(0.5)
        text = log_path.read_text()
        prefill_url = re.search(r"prefill (http://\S+),", text).group(1)
        decode_url = re.search(r"decode (http://\S+)\)", text).group(1)
        print(f"cluster up at {router}; idle for {args.idle_minutes} min", flush=True)
        time.sleep(args.idle_minutes * 60)
        idle_ok = httpx.post(router + "/generate", timeout=120, json={
            "text": PROMPTS[0], "sampling_params": {"max_new_tokens": 4}}).status_code == 200
        rss_idle = cluster_rss(proc.pid)

        tally, stop, faults, outages = Tally(), threading.Event(), [], []
        threads = [threading.Thread(target=client_loop, args=(router, tally, stop, s)) for s in range(args.clients)]
        threads.append(threading.Thread(target=fault_loop, args=(router, proc.pid, bootstrap, tally, stop,
                                                                 args.fault_every_s, args.kill_every_s, faults,
                                                                 outages)))
        print(f"traffic for {args.traffic_minutes} min", flush=True)
        for t in threads:
            t.start()
        time.sleep(args.traffic_minutes * 60)
        stop.set()
        for t in threads:
            t.join(300)
        time.sleep(10)  # drain: aborted and disconnected requests finish, pages return
        rss_end = cluster_rss(proc.pid)
        leaked = {name: pages_used(url) for name, url in (("prefill", prefill_url), ("decode", decode_url))}
        restarts = log_path.read_text().count("restarting it")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()

    growth = (rss_end - rss_idle) / rss_idle * 100
    rows = [
        ("idle phase", f"{args.idle_minutes:g} min, then a request: {'answered' if idle_ok else 'FAILED'}"),
        ("traffic", (f"{args.traffic_minutes:g} min, {args.clients} clients (0.5 s back-off after a failure), "
                     f"a fault every {args.fault_every_s:g} s, the decode's TP rank 1 killed every "
                     f"{args.kill_every_s:g} s")),
        ("requests sent", str(tally.sent)),
        ("answers by status", ", ".join(f"{k}: {v}" for k, v in sorted(tally.status.items()))),
        ("lost (no answer, outside deliberate outages)", str(len(tally.lost))),
        ("5xx outside deliberate outages", str(len(tally.unexpected_5xx))),
        ("faults injected", str(len(faults))),
        ("server restarts by --role all", str(restarts)),
        ("outages (TP rank killed) until served again", ", ".join(f"{o:.0f} s" for o in outages) or "none"),
        ("cluster RSS after idle / after traffic",
         f"{rss_idle / 2**20:.0f} MiB / {rss_end / 2**20:.0f} MiB ({growth:+.1f} %)"),
        ("KV pages in use at the end (leaked)", ", ".join(f"{k}: {v}" for k, v in leaked.items())),
    ]
    body = "\n".join([
        "`python benchmarks/soak.py " + " ".join(sys.argv[1:]) + "`: a `--role all` cluster (bundled model, "
        "decode TP=2 g=2) on this machine; " + __doc__.split("\n\n")[1].replace("\n", " "),
        "",
        "| measure | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        "Lost requests: " + ("none" if not tally.lost else "; ".join(tally.lost[:20])),
        "",
        "Unexpected 5xx: " + ("none" if not tally.unexpected_5xx else "; ".join(tally.unexpected_5xx[:20])),
    ])
    name = "soak" + (f"_{args.tag}" if args.tag else "")
    print(write_result(name, "Soak: idle, then mixed traffic with faults", body))
    print(body)


if __name__ == "__main__":
    main()
