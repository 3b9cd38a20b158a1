"""Router overhead: tpla_router against SGLang's router (sglang-router, Rust) on the same stub workers.

Both routers front the same stub prefill and decode processes (tests/router/stub_worker.py), which
answer at once. For /generate, plain and streaming, and for each target (the decode stub directly,
tpla_router, sglang-router) the script measures
  * latency: --latency-requests sequential requests, time to the last byte, p50 / p99; "added" is a
    router's figure minus the direct-to-stub figure;
  * throughput: --requests requests at --concurrency, from --loadgen-procs processes;
  * CPU per request: the target process's user+system CPU time over the throughput phase, divided by
    the requests served (all threads; robust to other load on the machine, unlike req/s).
Targets alternate within each of --rounds rounds and the table shows medians over rounds. Every
phase stops after --phase-time-limit seconds; a phase cut short is marked.

    python benchmarks/bench_router.py [--requests 3000] [--concurrency 64] [--rounds 3]

Needs `pip install sglang-router` (0.3.2 measured) unless --no-sglang. Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "router"))
from router_procs import RouterProcess, StubWorker, free_port

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "The quick brown fox jumps over the lazy dog. " * 4
DIRECT = "decode stub, direct"


@dataclass
class Phase:
    latencies: list[float]
    errors: int
    wall: float
    cpu: float
    cut_short: bool

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.wall if self.wall > 0 else 0.0

    @property
    def cpu_ms_per_request(self) -> float:
        return 1e3 * self.cpu / max(1, len(self.latencies))

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3 if xs else float("nan")


@dataclass
class Series:
    """One (mode, target) cell over all rounds."""

    latency: list[Phase] = field(default_factory=list)
    throughput: list[Phase] = field(default_factory=list)

    def median(self, values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")


async def _drive(url: str, body: bytes, n: int, concurrency: int, deadline: float
                 ) -> tuple[list[float], int, float, float]:
    latencies: list[float] = []
    errors = 0
    issued = 0
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def worker() -> None:
            nonlocal errors, issued
            while issued < n and time.time() < deadline:
                issued += 1
                t = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as r:
                        await r.read()
                        ok = r.status == 200
                except aiohttp.ClientError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t)
                else:
                    errors += 1

        start = time.time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        end = time.time()
    return latencies, errors, start, end


def _loadgen(url: str, body: bytes, n: int, concurrency: int, time_limit: float, ready: mp.Queue,
             go: mp.Event, out: mp.Queue) -> None:
    ready.put(os.getpid())
    go.wait()
    out.put(asyncio.run(_drive(url, body, n, concurrency, time.time() + time_limit)))


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a whole process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_phase(url: str, body: bytes, n: int, concurrency: int, procs: int, time_limit: float,
              pid: int) -> Phase:
    ctx = mp.get_context("fork")
    ready, go, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = max(1, min(procs, concurrency))
    workers = []
    for i in range(procs):
        share_n = n // procs + (i < n % procs)
        share_c = concurrency // procs + (i < concurrency % procs)
        p = ctx.Process(target=_loadgen, args=(url, body, share_n, share_c, time_limit, ready, go, out))
        p.start()
        workers.append(p)
    for _ in workers:
        ready.get()
    cpu0 = _cpu_seconds(pid)
    go.set()
    results = [out.get() for _ in workers]
    cpu = _cpu_seconds(pid) - cpu0
    for p in workers:
        p.join()
    latencies = [x for r in results for x in r[0]]
    errors = sum(r[1] for r in results)
    wall = max(r[3] for r in results) - min(r[2] for r in results)
    return Phase(latencies, errors, wall, cpu, len(latencies) + errors < n)


def _has(dist: str) -> bool:
    try:
        metadata.version(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="requests per throughput phase")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency-requests", type=int, default=400, help="sequential requests per latency phase")
    parser.add_argument("--loadgen-procs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--phase-time-limit", type=float, default=60.0)
    parser.add_argument("--stream-chunks", type=int, default=4, help="events per streamed answer")
    parser.add_argument("--no-sglang", action="store_true", help="measure tpla_router only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not args.no_sglang and not _has("sglang-router"):
        parser.error("sglang-router is not installed (pip install sglang-router==0.3.2), or pass --no-sglang")

    load_at_start = os.getloadavg()[0]
    prefill, decode = StubWorker.many(["prefill", "decode"], quiet=True)
    routers: dict[str, RouterProcess] = {}
    try:
        for s in (prefill, decode):
            s.configure(record=False, chunks=args.stream_chunks)
        common = ["--prefill", prefill.url, "8998", "--decode", decode.url, "--policy", "round_robin"]
        routers["tpla_router"] = RouterProcess(common + ["--log-level", "warning"])
        if not args.no_sglang:
            routers["sglang-router"] = RouterProcess(
                ["--pd-disaggregation", *common, "--log-level", "warn", "--prometheus-port", str(free_port())],
                module="sglang_router.launch_router")
        targets = {DIRECT: (decode.url, decode.proc.pid)} | {
            name: (r.url, r.proc.pid) for name, r in routers.items()}
        results: dict[tuple[str, str], Series] = {}
        for mode, stream in (("generate", False), ("generate, stream", True)):
            body = json.dumps({"text": PROMPT, "sampling_params": {"max_new_tokens": 16, "temperature": 0},
                               "stream": stream}).encode()
            for url, pid in targets.values():  # warm-up: connections, allocator, caches
                run_phase(url + "/generate", body, 300, 16, 1, args.phase_time_limit, pid)
            names = list(targets)
            for r in range(args.rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    url, pid = targets[name]
                    cell = results.setdefault((mode, name), Series())
                    cell.latency.append(run_phase(url + "/generate", body, args.latency_requests, 1, 1,
                                                  args.phase_time_limit, pid))
                    cell.throughput.append(run_phase(url + "/generate", body, args.requests, args.concurrency,
                                                     args.loadgen_procs, args.phase_time_limit, pid))
                    t, lat = cell.throughput[-1], cell.latency[-1]
                    print(f"round {r} {mode:17s} {name:20s} {t.rate:7.0f} req/s {t.cpu_ms_per_request:6.3f} "
                          f"CPU-ms/req  seq p50 {lat.pct(0.5):6.2f} ms p99 {lat.pct(0.99):6.2f} ms", flush=True)
        print(f"wrote {_write(args, results, load_at_start)}")
    finally:
        for router in routers.values():
            router.stop()
        prefill.stop()
        decode.stop()


def _write(args: argparse.Namespace, results: dict[tuple[str, str], Series], load_at_start: float) -> Path:
    today = time.strftime("%Y-%m-%d")
    versions = [f"{dist} {metadata.version(dist)}" if _has(dist) else f"no {dist}"
                for dist in ("httptools", "orjson", "uvloop")]
    versions.append(f"aiohttp {metadata.version('aiohttp')} (load generators, stubs)")
    if _has("sglang-router"):
        versions.append(f"sglang-router {metadata.version('sglang-router')}")
    lines = [
        "# Router overhead: tpla_router vs SGLang's router (PD mode, stub workers)",
        "",
        f"Date: {today}  ",
        (f"Machine: {_cpu_name()}, {os.cpu_count()} logical CPUs, 1-min load average {load_at_start:.1f} "
        f"before the run and {os.getloadavg()[0]:.1f} after it; Python {platform.python_version()}; "
        f"{', '.join(versions)}  "),
        (f"Throughput: {args.requests} requests at concurrency {args.concurrency} from {args.loadgen_procs} "
        f"aiohttp load-generator processes. Latency: {args.latency_requests} sequential requests, time to the "
        f"last byte. Streamed answers carry {args.stream_chunks} events. Medians over {args.rounds} rounds, "
        "targets alternating.  "),
        ("Both routers use round_robin over one prefill and one decode stub (instant answers) on the same "
        "machine as the load generators; 'added' = router latency minus direct-to-stub latency. CPU-ms/req "
        "is the target process's CPU time (all threads) per request served; it depends far less than req/s "
        "and p99 on what else runs on the machine."),
        "",
        "| mode | target | req/s | CPU-ms/req | p50 ms | p99 ms | added p50 ms | added p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (mode, name), cell in results.items():
        base = results[(mode, DIRECT)]
        p50 = cell.median([p.pct(0.5) for p in cell.latency])
        p99 = cell.median([p.pct(0.99) for p in cell.latency])
        b50 = base.median([p.pct(0.5) for p in base.latency])
        b99 = base.median([p.pct(0.99) for p in base.latency])
        rate = f"{cell.median([p.rate for p in cell.throughput]):.0f}"
        if any(p.cut_short for p in cell.throughput):
            rate += " (cut short)"
        cpu = cell.median([p.cpu_ms_per_request for p in cell.throughput])
        errors = sum(p.errors for p in cell.latency + cell.throughput)
        added = "– | –" if name == DIRECT else f"{p50 - b50:.2f} | {p99 - b99:.2f}"
        lines.append(f"| {mode} | {name} | {rate} | {cpu:.3f} | {p50:.2f} | {p99:.2f} | {added} | {errors} |")
    lines += _targets(results)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"router_{today}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _targets(results: dict[tuple[str, str], Series]) -> list[str]:
    """tpla_router against the targets (req/s >= sglang-router's, CPU-ms/req <= 1.2x its, added p50 <= 1 ms)."""
    modes = sorted({mode for mode, name in results if name == "sglang-router"})
    if not modes:
        return []
    lines = ["", "Targets, from the medians above (tpla_router / sglang-router):", ""]
    for mode in modes:
        ours, theirs, base = (results[(mode, n)] for n in ("tpla_router", "sglang-router", DIRECT))
        rate = [s.median([p.rate for p in s.throughput]) for s in (ours, theirs)]
        cpu = [s.median([p.cpu_ms_per_request for p in s.throughput]) for s in (ours, theirs)]
        added = ours.median([p.pct(0.5) for p in ours.latency]) - base.median([p.pct(0.5) for p in base.latency])
        verdicts = [f"req/s {rate[0] / rate[1]:.2f}x ({'met' if rate[0] >= rate[1] else 'missed'})",
                    f"CPU-ms/req {cpu[0] / cpu[1]:.2f}x ({'met' if cpu[0] <= 1.2 * cpu[1] else 'missed'})",
                    f"added p50 {added:.2f} ms ({'met' if added <= 1.0 else 'missed'})"]
        lines.append(f"- {mode}: " + "; ".join(verdicts))
    return lines


if __name__ == "__main__":
    main()
