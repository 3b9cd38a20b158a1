"""The TP group: ranks as processes, how they join, and how a dead rank is reported (DESIGN §7).

Rank 0 lives in the engine's process and schedules; ranks 1..T-1 are spawned processes that load only
their shards and replay rank 0's control operations. Announcements travel over a gloo group; the model's
own collectives (all-reduce, all-gather) run on the default group (gloo on CPU, NCCL on GPU). A rank that
dies breaks the next collective, and rank 0 reports which rank died and why instead of hanging.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import multiprocessing as mp
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist

from tpla_serve.config import EngineConfig
from tpla_serve.distributed.control import ControlChannel, ControlOp, Shutdown
from tpla_serve.net import free_port

if TYPE_CHECKING:
    from tpla_serve.distributed.worker import BuildRank

logger = logging.getLogger(__name__)
T = TypeVar("T")

# A collective that waits longer than this is treated as a dead peer.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("TPLA_TP_TIMEOUT_S", "300")))


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    device = config.torch_device
    if device.type == "cuda":
        return torch.device("cuda", rank if device.index is None else device.index + rank)
    return device


def share_cpu_cores(tp_size: int, rank: int) -> None:
    """CPU ranks split the cores: T processes each running all cores' threads oversubscribe them, and the
    threads' spin-waits make every step several times slower."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // tp_size)
    if torch.get_num_threads() > threads:
        torch.set_num_threads(threads)
        if rank == 0:
            logger.info("CPU tensor parallelism: %d threads per rank on %d cores", threads, cores)


def _join_process_group(config: EngineConfig, rank: int, port: int) -> ControlChannel:
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


class RankProcesses:
    """Rank 0's handle on ranks 1..T-1: starts them, notices when one dies, stops them."""

    def __init__(self, config: EngineConfig, build: BuildRank) -> None:
        from tpla_serve.distributed.worker import run_worker  # the spawned ranks' entry point

        self.port = free_port()
        ctx = mp.get_context("spawn")
        self.errors = ctx.Queue()
        fields = dataclasses.asdict(config)
        self.procs = [
            ctx.Process(
                target=run_worker, args=(r, fields, self.port, self.errors, build), daemon=True, name=f"tp-rank-{r}"
            )
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


class TPGroup:
    """One rank's membership of the TP group: the control channel and, on rank 0, the other ranks."""

    def __init__(self, rank: int, size: int, control: ControlChannel, processes: RankProcesses | None) -> None:
        self.rank = rank
        self.size = size
        self.control = control
        self.processes = processes

    @classmethod
    def launch(cls, config: EngineConfig, build: BuildRank) -> TPGroup:
        """Rank 0: spawn ranks 1..T-1 (each builds its parts with `build`) and join the group with them."""
        processes = RankProcesses(config, build)
        joined_before = dist.is_initialized()
        try:
            control = _join_process_group(config, 0, processes.port)
        except Exception as e:
            if dist.is_initialized() and not joined_before:  # a half-joined group of ours
                dist.destroy_process_group()
            processes.kill()
            raise RuntimeError(processes.failure() or f"joining the TP group failed: {e}") from e
        return cls(0, config.tp_size, control, processes)

    @classmethod
    def join(cls, config: EngineConfig, rank: int, port: int) -> TPGroup:
        """Ranks > 0: join the group rank 0 opened on `port`."""
        return cls(rank, config.tp_size, _join_process_group(config, rank, port), None)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def failure(self) -> str | None:
        return self.processes.failure() if self.processes is not None else None

    def collective(self, fn: Callable[[], T]) -> T:
        """Run something that talks to the other ranks; a dead rank becomes a clear error, not a hang."""
        try:
            return fn()
        except Exception as e:
            raise RuntimeError(self.failure() or f"TP rank {self.rank}: a collective failed: {e}") from e

    def announce(self, op: ControlOp) -> None:
        """Rank 0: tell every other rank to run `op` (rank 0 then runs its own part)."""
        self.collective(lambda: self.control.send(op))

    def barrier(self) -> None:
        self.collective(lambda: dist.barrier(group=self.control.group))

    def all_ranks(self, value: bool) -> bool:
        """Whether `value` holds on every rank (a collective: every rank calls it)."""
        flag = torch.tensor([int(value)], dtype=torch.int64)
        self.collective(lambda: dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.control.group))
        return bool(flag.item())

    def min_over_ranks(self, value: int, device: torch.device) -> int:
        """The smallest of every rank's `value` (a collective), e.g. the KV pages every rank can hold."""
        n = torch.tensor([value], dtype=torch.int64, device=device)
        self.collective(lambda: dist.all_reduce(n, op=dist.ReduceOp.MIN))
        return int(n.item())

    def all_gather_bytes(self, data: bytes, size: int) -> list[bytes]:
        """Every rank's `data` (at most `size` bytes), in rank order, through a fixed-size all-gather."""
        if len(data) > size:
            raise ValueError(f"{len(data)} bytes do not fit an all-gather of {size}")
        framed = len(data).to_bytes(8, "little") + data
        mine = torch.zeros(size + 8, dtype=torch.uint8)
        mine[: len(framed)] = torch.frombuffer(bytearray(framed), dtype=torch.uint8)
        parts = [torch.empty_like(mine) for _ in range(self.size)]
        self.collective(lambda: dist.all_gather(parts, mine, group=self.control.group))
        out = []
        for p in parts:
            raw = p.numpy().tobytes()
            out.append(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        return out

    def shutdown(self, kill: bool = False) -> None:
        """Rank 0: stop the other ranks (kill: without telling them, after a failed start), then every rank
        leaves the group at once (NCCL's teardown waits for its peers)."""
        if self.processes is not None:
            told = False
            if kill:
                self.processes.kill()
            elif self.processes.failure() is None:
                try:
                    self.control.send(Shutdown())
                    told = True
                except Exception:  # a rank already gone: nothing left to tell
                    logger.warning("TP shutdown: could not reach every rank")
            if told:
                self.leave()
            self.processes.join()
            self.processes = None
        self.leave()

    def leave(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

