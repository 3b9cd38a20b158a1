"""Tensor parallelism as processes: the TP group, rank 0's control operations, the other ranks' loop."""

from tpla_serve.distributed.control import (
    AwaitRoom,
    CancelRoom,
    ControlOp,
    ControlReceiver,
    ControlSender,
    ExpectRoom,
    RandomizeKV,
    RankZeroGone,
    RunDecode,
    RunDraftBlock,
    RunDraftStep,
    RunStep,
    Shutdown,
)
from tpla_serve.distributed.group import TPGroup, rank_device

__all__ = [
    "AwaitRoom",
    "CancelRoom",
    "ControlOp",
    "ControlReceiver",
    "ControlSender",
    "ExpectRoom",
    "RandomizeKV",
    "RankZeroGone",
    "RunDecode",
    "RunDraftBlock",
    "RunDraftStep",
    "RunStep",
    "Shutdown",
    "TPGroup",
    "rank_device",
]
