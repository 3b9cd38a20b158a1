"""Ranks > 0: join the TP group, build this rank's parts, then run rank 0's operations until told to stop.

What a rank builds (model runner, draft, KV port) is not this module's business: the caller passes a
`BuildRank` function that returns the rank's handler table, one handler per control operation type. On
node 0 rank 0 spawns the node's other ranks; on every other node of a multi-node server `run_node` does,
and watches them until they leave (rank 0 gone: exit 0) or one fails (the others are stopped: exit 1).
"""

from __future__ import annotations

import logging
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tpla_serve.config import EngineConfig
from tpla_serve.distributed.control import ControlOp, RankZeroGone, Shutdown
from tpla_serve.distributed.group import RankProcesses, TPGroup
from tpla_serve.distributed.nodes import Rendezvous

logger = logging.getLogger(__name__)


@dataclass
class RankHandlers:
    """What a rank > 0 does with each operation type, and how it releases what it built."""

    handlers: dict[type, Callable[[Any], None]]
    close: Callable[[], None] = field(default=lambda: None)


BuildRank = Callable[[EngineConfig, TPGroup], RankHandlers]


def serve(tp: TPGroup, rank: RankHandlers) -> None:
    """Replay rank 0's operations until Shutdown."""
    while True:
        op: ControlOp = tp.receive()
        if isinstance(op, Shutdown):
            return
        handler = rank.handlers.get(type(op))
        if handler is None:
            raise RuntimeError(f"TP rank {tp.rank} has no handler for {type(op).__name__}")
        handler(op)


def _peer_closed(e: RuntimeError) -> bool:
    return "Connection closed by peer" in str(e) or "Connection reset by peer" in str(e)


def run_worker(
    rank: int, config_fields: dict[str, Any], meet: Rendezvous, errors: Any, build: BuildRank
) -> None:
    """Entry point of a spawned rank; a failure is reported to its parent before the process dies."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s TP{rank} %(levelname)s %(name)s: %(message)s")
    try:
        config = EngineConfig(**config_fields)
        tp = TPGroup.join(config, rank, meet)
        parts = build(config, tp)
    except BaseException:  # report to rank 0 before dying, so its error says why
        errors.put((rank, traceback.format_exc()))
        raise
    try:
        serve(tp, parts)
    except RankZeroGone:
        logger.info("rank 0 is gone; TP rank %d exits", rank)
    except RuntimeError as e:
        if not _peer_closed(e):
            errors.put((rank, traceback.format_exc()))
            raise
        logger.info("rank 0 is gone; TP rank %d exits", rank)
    finally:
        parts.close()
        tp.leave()


NODE_POLL_S = 0.5


def run_node(config: EngineConfig, build: BuildRank) -> int:
    """Node `config.node_rank` > 0 of a multi-node server: run its TP ranks until they end. Returns the
    exit code: 0 when every rank left (rank 0 shut the group down, or is gone), 1 when one failed."""
    if config.node_rank == 0:
        raise ValueError("node 0 runs rank 0 and serves HTTP: start it as a server, not with run_node")
    stop: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.append(signum))
    host, port = config.dist_init_host_port
    logger.info("node %d of %d: TP ranks %s, meeting rank 0 at %s:%d", config.node_rank, config.nnodes,
                list(config.node_ranks), host, port)
    ranks = RankProcesses(config, build, Rendezvous.of(config), config.node_ranks)
    try:
        while not stop:
            codes = [p.exitcode for p in ranks.procs]
            if any(c not in (None, 0) for c in codes):
                logger.error("%s; stopping this node's other ranks", ranks.failure())
                return 1
            if all(c == 0 for c in codes):
                logger.info("node %d: every TP rank has left the group; exiting", config.node_rank)
                return 0
            time.sleep(NODE_POLL_S)
        logger.info("node %d: stopping on signal %d", config.node_rank, stop[0])
        return 0
    finally:
        ranks.kill()
        ranks.join()
