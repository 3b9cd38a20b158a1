"""Tensor-parallel ranks as processes.

Rank 0 lives in the engine's process and schedules; ranks 1..T-1 are spawned processes that load only their
shards and replay every step rank 0 runs. Rank 0 announces each step with a msgpack message broadcast over a
gloo group (never pickle); the model's own collectives (all-reduce, all-gather) run on the default group
(gloo on CPU, NCCL on GPU). A rank that dies breaks the next collective, and the engine reports which rank
died and why instead of hanging.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import multiprocessing as mp
import os
import socket
import traceback
from typing import Any

import msgpack
import torch
import torch.distributed as dist

from tpla_serve.config import EngineConfig

logger = logging.getLogger(__name__)

# A collective that waits longer than this is treated as a dead peer.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("TPLA_TP_TIMEOUT_S", "300")))
MAX_CONTROL_BYTES = 1 << 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    device = config.torch_device
    if device.type == "cuda":
        return torch.device("cuda", rank if device.index is None else device.index + rank)
    return device


class ControlChannel:
    """Rank 0's step announcements to the other ranks: a length, then msgpack bytes, over a gloo group."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def send(self, message: dict[str, Any]) -> None:
        data = msgpack.packb(message, use_bin_type=True)
        dist.broadcast(torch.tensor([len(data)], dtype=torch.int64), src=0, group=self.group)
        dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), src=0, group=self.group)

    def receive(self) -> dict[str, Any]:
        size = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(size, src=0, group=self.group)
        n = int(size.item())
        if not 0 < n <= MAX_CONTROL_BYTES:
            raise RuntimeError(f"control message of {n} bytes from rank 0 is out of bounds")
        buf = torch.empty(n, dtype=torch.uint8)
        dist.broadcast(buf, src=0, group=self.group)
        return msgpack.unpackb(buf.numpy().tobytes(), raw=False)


def share_cpu_cores(tp_size: int, rank: int) -> None:
    """CPU ranks split the cores: T processes each running all cores' threads oversubscribe them, and the
    threads' spin-waits make every step several times slower."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // tp_size)
    if torch.get_num_threads() > threads:
        torch.set_num_threads(threads)
        if rank == 0:
            logger.info("CPU tensor parallelism: %d threads per rank on %d cores", threads, cores)


def init_tp(config: EngineConfig, rank: int, port: int) -> ControlChannel:
    """Join the TP group; every rank calls this with the same port."""
    device = rank_device(config, rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        share_cpu_cores(config.tp_size, rank)
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=config.tp_size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    group = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
    return ControlChannel(group)


def _worker_main(rank: int, config_fields: dict[str, Any], port: int, errors: Any) -> None:
    from tpla_serve.engine.model_runner import ModelRunner

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s TP{rank} %(levelname)s %(name)s: %(message)s")
    try:
        config = EngineConfig(**config_fields)
        control = init_tp(config, rank, port)
        runner = ModelRunner(config, rank=rank, control=control)
    except BaseException:  # report to rank 0 before dying, so its error says why
        errors.put((rank, traceback.format_exc()))
        raise
    try:
        runner.serve_forever()
    except RuntimeError as e:
        if not _peer_closed(e):
            errors.put((rank, traceback.format_exc()))
            raise
        logger.info("rank 0 is gone; TP rank %d exits", rank)
    finally:
        runner.shutdown()


def _peer_closed(e: RuntimeError) -> bool:
    return "Connection closed by peer" in str(e) or "Connection reset by peer" in str(e)


class TPRanks:
    """Rank 0's handle on ranks 1..T-1: starts them, notices when one dies, stops them."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.port = free_port()
        ctx = mp.get_context("spawn")
        self.errors = ctx.Queue()
        fields = dataclasses.asdict(config)
        self.procs = [
            ctx.Process(target=_worker_main, args=(r, fields, self.port, self.errors), daemon=True, name=f"tp-rank-{r}")
            for r in range(1, config.tp_size)
        ]
        for p in self.procs:
            p.start()
        logger.info("started %d TP ranks (pids %s)", len(self.procs), [p.pid for p in self.procs])

    def failure(self) -> str | None:
        """Why a rank died, or None while all live."""
        dead = [(i + 1, p.exitcode) for i, p in enumerate(self.procs) if not p.is_alive()]
        if not dead:
            return None
        reasons = []
        while not self.errors.empty():
            rank, tb = self.errors.get_nowait()
            reasons.append(f"rank {rank}:\n{tb}")
        ranks = ", ".join(f"rank {r} (exit code {c})" for r, c in dead)
        return f"TP {ranks} died" + ("; " + "\n".join(reasons) if reasons else "")

    def join(self, timeout: float = 30.0) -> None:
        for p in self.procs:
            p.join(timeout)
            if p.is_alive():
                p.kill()
                p.join()

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
