"""Ranks > 0: join the TP group, build this rank's parts, then run rank 0's operations until told to stop.

What a rank builds (model runner, draft, KV port) is not this module's business: rank 0 passes a
`BuildRank` function that returns the rank's handler table, one handler per control operation type.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tpla_serve.config import EngineConfig
from tpla_serve.distributed.control import ControlOp, RankZeroGone, Shutdown
from tpla_serve.distributed.group import TPGroup

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


def run_worker(rank: int, config_fields: dict[str, Any], port: int, errors: Any, build: BuildRank) -> None:
    """Entry point of a spawned rank; a failure is reported to rank 0 before the process dies."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s TP{rank} %(levelname)s %(name)s: %(message)s")
    try:
        config = EngineConfig(**config_fields)
        tp = TPGroup.join(config, rank, port)
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
