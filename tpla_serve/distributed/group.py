"""The TP group: ranks as processes, how they join, and how a dead rank is reported (DESIGN §7).

Rank 0 lives in the engine's process and schedules; ranks 1..T-1 are spawned processes that load only
their shards and replay rank 0's control operations. The ranks meet at a rendezvous store rank 0 serves
on the TP host; announcements travel over ZMQ (an idle rank blocks without a timeout); barriers and votes
run on a gloo group, the model's own collectives (all-reduce, all-gather) on the default group (gloo on
CPU, NCCL on GPU). Rank 0 watches the other ranks' processes: one that dies while starting is reported at
once, with its reason, and one that dies later fails the next announcement or collective with a clear
error instead of a hang.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import multiprocessing as mp
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist

from tpla_serve.config import EngineConfig
from tpla_serve.distributed.control import ControlOp, ControlReceiver, ControlSender, Shutdown

if TYPE_CHECKING:
    from tpla_serve.distributed.worker import BuildRank

logger = logging.getLogger(__name__)
T = TypeVar("T")

# A collective that waits longer than this is treated as a dead peer.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("TPLA_TP_TIMEOUT_S", "300")))
TP_HOST = "127.0.0.1"  # the ranks of one server share a host
JOIN_POLL_S = 0.05
JOIN_TIMEOUT_S = 600.0  # spawned ranks import torch and set up their device first; a dead one is seen at once


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


def _init_process_group(config: EngineConfig, rank: int, store: dist.Store) -> None:
    """Join the default group (the model's collectives) through the rendezvous store."""
    device = rank_device(config, rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        share_cpu_cores(config.tp_size, rank)
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=config.tp_size, timeout=COLLECTIVE_TIMEOUT
    )


def _control_group() -> dist.ProcessGroup:
    """Barriers and votes between rank 0 and the others run on gloo, beside NCCL on GPU."""
    return dist.new_group(backend="gloo") if dist.get_backend() == "nccl" else dist.group.WORLD


def _listening_socket(host: str) -> socket.socket:
    """The rendezvous store's socket, bound to the TP host only (not every interface)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(128)
    return sock


class RankProcesses:
    """Rank 0's handle on ranks 1..T-1: starts them, notices when one dies, stops them."""

    def __init__(self, config: EngineConfig, build: BuildRank, store_port: int) -> None:
        from tpla_serve.distributed.worker import run_worker  # the spawned ranks' entry point

        self.port = store_port
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

    def failure(self, starting: bool = False) -> str | None:
        """Why a rank died, or None while all live. starting: the ranks have not joined the group yet."""
        dead = [(i + 1, p.exitcode) for i, p in enumerate(self.procs) if not p.is_alive()]
        if not dead:
            return None
        reasons = []
        while not self.errors.empty():
            rank, tb = self.errors.get_nowait()
            reasons.append(f"rank {rank}:\n{tb}")
        ranks = ", ".join(f"rank {r} (exit code {c})" for r, c in dead)
        message = f"TP {ranks} died" + ("; " + "\n".join(reasons) if reasons else "")
        if starting and not reasons:
            message += (
                " before it could start. TP ranks are spawned processes that import the main module again: "
                "if this script creates the Engine at import time, move that under "
                "`if __name__ == \"__main__\":` (the rank's own error is printed above)"
            )
        return message

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
    """One rank's membership of the TP group: the control channel (rank 0 sends, the others receive), the
    gloo group for barriers and votes, and, on rank 0, the other ranks' processes."""

    def __init__(
        self,
        rank: int,
        size: int,
        group: dist.ProcessGroup,
        store: dist.TCPStore,
        sender: ControlSender | None = None,
        receiver: ControlReceiver | None = None,
        processes: RankProcesses | None = None,
    ) -> None:
        self.rank = rank
        self.size = size
        self.group = group
        self.store = store  # the ranks' rendezvous, kept while the group lives
        self.sender = sender
        self.receiver = receiver
        self.processes = processes

    @classmethod
    def launch(cls, config: EngineConfig, build: BuildRank) -> TPGroup:
        """Rank 0: spawn ranks 1..T-1 (each builds its parts with `build`) and join the group with them.
        A rank that dies before it joins is reported within a fraction of a second, with its reason."""
        listener = _listening_socket(TP_HOST)
        port = listener.getsockname()[1]
        store = dist.TCPStore(
            TP_HOST, port, config.tp_size, True, COLLECTIVE_TIMEOUT,
            wait_for_workers=False, master_listen_fd=listener.detach(),  # the store owns the socket now
        )
        processes = RankProcesses(config, build, port)
        joined_before = dist.is_initialized()
        try:
            keys = [f"control/{r}" for r in range(1, config.tp_size)]
            deadline = time.monotonic() + JOIN_TIMEOUT_S
            while not store.check(keys):
                if (why := processes.failure(starting=True)) is not None:
                    raise RuntimeError(why)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"TP ranks did not join within {JOIN_TIMEOUT_S:.0f} s")
                time.sleep(JOIN_POLL_S)
            _init_process_group(config, 0, store)
            group = _control_group()
            sender = ControlSender([store.get(k).decode() for k in keys])
        except Exception as e:
            if dist.is_initialized() and not joined_before:  # a half-joined group of ours
                dist.destroy_process_group()
            processes.kill()
            processes.join()
            if isinstance(e, RuntimeError):
                raise
            raise RuntimeError(f"joining the TP group failed: {e}") from e
        return cls(0, config.tp_size, group, store, sender=sender, processes=processes)

    @classmethod
    def join(cls, config: EngineConfig, rank: int, store_port: int) -> TPGroup:
        """Ranks > 0: announce this rank's control endpoint to rank 0's store and join the group."""
        store = dist.TCPStore(TP_HOST, store_port, config.tp_size, False, COLLECTIVE_TIMEOUT)
        receiver = ControlReceiver(TP_HOST)
        store.set(f"control/{rank}", receiver.endpoint)
        _init_process_group(config, rank, store)
        return cls(rank, config.tp_size, _control_group(), store, receiver=receiver)

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
        assert self.sender is not None, "only rank 0 announces"
        if (why := self.failure()) is not None:
            raise RuntimeError(why)
        self.sender.send(op)

    def receive(self) -> ControlOp:
        """Ranks > 0: the next operation rank 0 announced (blocks while the server is idle)."""
        assert self.receiver is not None, "rank 0 does not receive"
        return self.receiver.receive()

    def barrier(self) -> None:
        self.collective(lambda: dist.barrier(group=self.group))

    def all_ranks(self, value: bool) -> bool:
        """Whether `value` holds on every rank (a collective: every rank calls it)."""
        flag = torch.tensor([int(value)], dtype=torch.int64)
        self.collective(lambda: dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group))
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
        self.collective(lambda: dist.all_gather(parts, mine, group=self.group))
        out = []
        for p in parts:
            raw = p.numpy().tobytes()
            out.append(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        return out

    def shutdown(self, kill: bool = False) -> None:
        """Rank 0: stop the other ranks (kill: without telling them, after a failed start), then every rank
        leaves the group at once (NCCL's teardown waits for its peers). After a rank died, the others are
        killed and an NCCL group is not torn down (its teardown would wait for the dead rank)."""
        processes, self.processes = self.processes, None
        if processes is None:
            self.leave()
            return
        if kill or processes.failure() is not None:
            processes.kill()
            processes.join()
            if dist.is_initialized() and dist.get_backend() == "nccl":
                self._close_channel()
            else:
                self.leave()
            return
        if self.sender is not None:
            self.sender.send(Shutdown())
        self.leave()  # with the other ranks, which leave as they read Shutdown
        processes.join()

    def leave(self) -> None:
        self._close_channel()
        if dist.is_initialized():
            dist.destroy_process_group()

    def _close_channel(self) -> None:
        for end in (self.sender, self.receiver):
            if end is not None:
                end.close()
        self.sender = self.receiver = None

