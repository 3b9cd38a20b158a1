"""Messages between a server's HTTP front process and its scheduler process (one ZMQ hop each way).

Each message is one msgpack map {"v": version, "t": tag, ...fields}; an explicit tag → class map decodes
it (never pickle, never a lookup by class name). Both ends are this server's own processes, so decoding
checks the version and tag and lets dataclass construction reject missing or unknown fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Union

import msgpack

VERSION = 1


@dataclass(frozen=True)
class GenerateRequest:
    """One prompt, already tokenized and validated by the front (bad input never reaches the scheduler)."""

    rid: str
    input_ids: list[int]
    sampling_params: dict[str, Any]  # SamplingParams.to_dict()
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    stream: bool = False
    bootstrap_host: str | None = None  # PD: the prefill's host, room and bootstrap port
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None


@dataclass(frozen=True)
class AbortRequest:
    rid: str
    message: str = "aborted by request"


@dataclass(frozen=True)
class FlushCache:
    pass


@dataclass(frozen=True)
class GetStats:
    pass


@dataclass(frozen=True)
class RequestOutput:
    """The request's state as /generate returns it (cumulative text, output_ids, meta_info), and the times
    the front's latency metrics need. Times are CLOCK_MONOTONIC readings, which the front and its scheduler
    (always on one host) share: first_token_time once a token exists; queue_time (seconds waiting to be
    scheduled) and the KV transfer (PD decode) on the finished output only."""

    rid: str
    output: dict[str, Any]
    finished: bool
    first_token_time: float | None = None
    queue_time: float | None = None
    kv_transfer_bytes: int = 0
    kv_transfer_seconds: float = 0.0


@dataclass(frozen=True)
class RequestError:
    """The scheduler refused the request; status is the HTTP status the front answers with."""

    rid: str
    status: int
    message: str


@dataclass(frozen=True)
class Stats:
    data: dict[str, Any] = field(default_factory=dict)


Message = Union[GenerateRequest, AbortRequest, FlushCache, GetStats, RequestOutput, RequestError, Stats]
_TAGS: dict[int, type] = {
    1: GenerateRequest,
    2: AbortRequest,
    3: FlushCache,
    4: GetStats,
    5: RequestOutput,
    6: RequestError,
    7: Stats,
}
_TAG_OF = {cls: tag for tag, cls in _TAGS.items()}


def encode(msg: Message) -> bytes:
    return msgpack.packb({"v": VERSION, "t": _TAG_OF[type(msg)], **dataclasses.asdict(msg)}, use_bin_type=True)


def decode(data: bytes) -> Message:
    obj = msgpack.unpackb(data, raw=False)
    if not isinstance(obj, dict) or obj.pop("v", None) != VERSION:
        raise ValueError("not a message of this server's protocol version")
    cls = _TAGS.get(obj.pop("t", None))  # type: ignore[arg-type]
    if cls is None:
        raise ValueError("unknown message tag")
    return cls(**obj)
