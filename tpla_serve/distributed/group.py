"""The TP group: ranks as processes, how they join, and how a dead rank is reported (DESIGN §7).

Rank 0 lives in the engine's process and schedules; ranks 1..T-1 are spawned processes that load only
their shards and replay rank 0's control operations. The ranks meet at a rendezvous store rank 0 serves
(on loopback, or at --dist-init-addr when the server spans nodes, each node running tp_size / nnodes
ranks); announcements travel over ZMQ (an idle rank blocks without a timeout); barriers and votes run on
a gloo group, the model's own collectives (all-reduce, all-gather) on the default group (gloo on CPU, NCCL
on GPU). Rank 0 watches the other ranks' processes and connections: one that dies while starting is
reported at once, with its reason, and one that dies later (or whose host goes silent) fails the next
announcement or collective with a clear error instead of a hang.
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
from tpla_serve.distributed.liveness import HEARTBEAT_TIMEOUT_MS
from tpla_serve.distributed.nodes import Rendezvous, latent_groups_within_nodes, use_node_interface

if TYPE_CHECKING:
    from tpla_serve.distributed.worker import BuildRank

logger = logging.getLogger(__name__)
T = TypeVar("T")

# A collective that waits longer than this is treated as a dead peer.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("TPLA_TP_TIMEOUT_S", "300")))
JOIN_POLL_S = 0.05
JOIN_TIMEOUT_S = 600.0  # spawned ranks import torch and set up their device first; a dead one is seen at once


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    """A rank's device: on GPU, the node's card of its local rank (rank k on card k % (T / nnodes))."""
    device = config.torch_device
    if device.type == "cuda":
        local = rank % config.ranks_per_node
        return torch.device("cuda", local if device.index is None else device.index + local)
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


def _init_process_group(config: EngineConfig, rank: int, store: dist.Store, meet: Rendezvous) -> None:
    """Join the default group (the model's collectives) through the rendezvous store."""
    device = rank_device(config, rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if meet.spans_nodes:
        use_node_interface(meet.address)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        share_cpu_cores(config.ranks_per_node, rank)
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=config.tp_size, timeout=COLLECTIVE_TIMEOUT
    )


def _control_group() -> dist.ProcessGroup:
    """Barriers and votes between rank 0 and the others run on gloo, beside NCCL on GPU."""
    return dist.new_group(backend="gloo") if dist.get_backend() == "nccl" else dist.group.WORLD


def _listening_socket(meet: Rendezvous) -> socket.socket:
    """The rendezvous store's socket, bound to the TP host only (not every interface): loopback, or the
    --dist-init-addr of a server that spans nodes."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((meet.store_host, meet.store_port))
    except OSError as e:
        sock.close()
        raise RuntimeError(f"node 0 cannot listen at --dist-init-addr {meet.store_host}:{meet.store_port} "
                           f"({e}): it must be an address of node 0 and a free port") from None
    sock.listen(128)
    return sock


def _nodes_hint(config: EngineConfig, meet: Rendezvous) -> str:
    if not meet.spans_nodes:
        return ""
    return (f"; is every node started with --nnodes {config.nnodes} --node-rank N --dist-init-addr "
            f"{meet.store_host}:{meet.store_port} and able to reach it?")


class RankProcesses:
    """The handle on this node's spawned ranks (on node 0, ranks 1..T/N-1): starts them, notices when one
    dies, stops them."""

    def __init__(self, config: EngineConfig, build: BuildRank, meet: Rendezvous, ranks: range) -> None:
        from tpla_serve.distributed.worker import run_worker  # the spawned ranks' entry point

        ctx = mp.get_context("spawn")
        self.errors = ctx.Queue()
        fields = dataclasses.asdict(config)
        self.ranks = list(ranks)
        self.procs = [
            ctx.Process(
                target=run_worker, args=(r, fields, meet, self.errors, build), daemon=True,
                name=f"tp-rank-{r}",
            )
            for r in self.ranks
        ]
        for p in self.procs:
            p.start()
        logger.info("started TP ranks %s (pids %s)", self.ranks, [p.pid for p in self.procs])

    def failure(self, starting: bool = False) -> str | None:
        """Why a rank died, or None while all live. starting: the ranks have not joined the group yet."""
        dead = [(r, p.exitcode) for r, p in zip(self.ranks, self.procs) if not p.is_alive()]
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
        meet: Rendezvous,
        sender: ControlSender | None = None,
        receiver: ControlReceiver | None = None,
        processes: RankProcesses | None = None,
    ) -> None:
        self.rank = rank
        self.size = size
        self.group = group
        self.store = store  # the ranks' rendezvous, kept while the group lives
        self.meet = meet
        self.sender = sender
        self.receiver = receiver
        self.processes = processes

    @classmethod
    def launch(cls, config: EngineConfig, build: BuildRank) -> TPGroup:
        """Rank 0: spawn this node's ranks 1..T/N-1 (each builds its parts with `build`) and join the group
        with them and with the other nodes' ranks. A local rank that dies before it joins is reported within
        a fraction of a second, with its reason."""
        meet = Rendezvous.of(config)
        listener = _listening_socket(meet)
        meet = dataclasses.replace(meet, store_port=listener.getsockname()[1])
        store = dist.TCPStore(
            meet.store_host, meet.store_port, config.tp_size, True, COLLECTIVE_TIMEOUT,
            wait_for_workers=False, master_listen_fd=listener.detach(),  # the store owns the socket now
        )
        processes = RankProcesses(config, build, meet, config.node_ranks[1:])
        joined_before = dist.is_initialized()
        try:
            keys = [f"control/{r}" for r in range(1, config.tp_size)]
            if meet.spans_nodes and not latent_groups_within_nodes(config):
                logger.warning("TPLA latent groups of %d ranks do not fit the %d ranks of a node: a group "
                               "spans nodes", config.tp_size // config.tpla_groups, config.ranks_per_node)
            if meet.spans_nodes:
                logger.info("waiting for the TP ranks of nodes 1..%d at %s:%d", config.nnodes - 1,
                            meet.store_host, meet.store_port)
            deadline = time.monotonic() + JOIN_TIMEOUT_S
            while not store.check(keys):
                if (why := processes.failure(starting=True)) is not None:
                    raise RuntimeError(why)
                if time.monotonic() > deadline:
                    missing = [k.split("/")[1] for k in keys if not store.check([k])]
                    raise RuntimeError(f"TP ranks {', '.join(missing)} did not join within "
                                       f"{JOIN_TIMEOUT_S:.0f} s{_nodes_hint(config, meet)}")
                time.sleep(JOIN_POLL_S)
            _init_process_group(config, 0, store, meet)
            group = _control_group()
            endpoints = {r: store.get(f"control/{r}").decode() for r in range(1, config.tp_size)}
            sender = ControlSender(endpoints, heartbeats=meet.spans_nodes)
        except Exception as e:
            if dist.is_initialized() and not joined_before:  # a half-joined group of ours
                dist.destroy_process_group()
            processes.kill()
            processes.join()
            if isinstance(e, RuntimeError):
                raise
            raise RuntimeError(f"joining the TP group failed: {e}") from e
        return cls(0, config.tp_size, group, store, meet, sender=sender, processes=processes)

    @classmethod
    def join(cls, config: EngineConfig, rank: int, meet: Rendezvous) -> TPGroup:
        """Ranks > 0: announce this rank's control endpoint to rank 0's store and join the group."""
        store = dist.TCPStore(meet.store_host, meet.store_port, config.tp_size, False, COLLECTIVE_TIMEOUT)
        receiver = ControlReceiver(meet.address, heartbeats=meet.spans_nodes)
        store.set(f"control/{rank}", receiver.endpoint)
        _init_process_group(config, rank, store, meet)
        return cls(rank, config.tp_size, _control_group(), store, meet, receiver=receiver)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def failure(self) -> str | None:
        """Rank 0: why the group cannot compute (a local rank's exit, a lost connection), or None."""
        local = self.processes.failure() if self.processes is not None else None
        return local or (self.sender.watch.lost if self.sender is not None else None)

    def on_lost(self, callback: Callable[[str], None]) -> None:
        """Rank 0: call `callback` (on another thread) when a rank's loss goes unhandled (PeerWatch)."""
        if self.sender is not None:
            self.sender.watch.on_lost = callback

    def collective(self, fn: Callable[[], T]) -> T:
        """Run something that talks to the other ranks; a dead rank becomes a clear error, not a hang."""
        try:
            return fn()
        except Exception as e:
            why = self._failure_after() or f"TP rank {self.rank}: a collective failed: {e}"
            raise RuntimeError(why) from e

    def _failure_after(self) -> str | None:
        """Which rank is gone, once a collective failed: a peer on another host is known by its lost
        connection, which the watch sees within a heartbeat timeout of the collective's error."""
        deadline = time.monotonic() + HEARTBEAT_TIMEOUT_MS / 1000
        watching = self.is_leader and self.meet.spans_nodes
        while (why := self.failure()) is None and watching and time.monotonic() < deadline:
            time.sleep(JOIN_POLL_S)
        return why

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
        if self.sender is not None:
            self.sender.watch.stop()  # the ranks' goodbyes below are not losses
        if kill or self.failure() is not None:
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

