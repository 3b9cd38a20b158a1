"""Why an attempt failed, read from what the workers did: no answer, a refusing status, or a decode
telling that its KV transfer failed (503 `kv_transfer_failed`, as its status or its stream's first
event; or an SGLang-style 200 whose finish_reason is an abort with no output).
"""

from __future__ import annotations

from typing import Any

import orjson

from .http import Response, UpstreamError, UpstreamResponse, UpstreamTimeout
from .worker import Worker

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
BREAKER_STATUSES = frozenset({500, 502, 503, 504})
KV_FAILED = "kv_transfer_failed"
ABORTED = "decode_aborted"

Pair = tuple[Worker, Worker]


class AttemptFailed(Exception):
    """Why one attempt failed. `blame`: the workers to avoid on the next attempt and, if `counts`, to
    charge to their circuit breakers. `answer`: the worker's own answer, returned as it is when the
    failure is not retryable. `status` / `error_type`: the error the client gets once retries run out;
    `in_stream`: that error goes out as an SSE event rather than an HTTP status."""

    def __init__(self, kind: str, message: str, retryable: bool, blame: tuple[Worker, ...],
                 counts: bool = True, status: int = 502, error_type: str | None = None,
                 answer: Response | None = None, in_stream: bool = False, unreachable: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retryable = retryable
        self.blame = blame
        self.counts = counts
        self.status = status
        self.error_type = error_type
        self.answer = answer
        self.in_stream = in_stream
        self.unreachable = unreachable


def lost(worker: Worker, error: UpstreamError) -> AttemptFailed:
    """No answer from `worker`: unreachable, connection broken, or out of time."""
    if isinstance(error, UpstreamTimeout):
        return AttemptFailed("timeout", "request timed out", retryable=False, blame=(), counts=False,
                             status=504)
    role = worker.role.value
    return AttemptFailed(f"{role}_unreachable", f"{role} worker {worker.url}: {error}", retryable=True,
                         blame=(worker,), unreachable=True)


def refused(worker: Worker, exchange: UpstreamResponse, body: bytes, pair: Pair) -> AttemptFailed:
    """`worker` answered with a non-2xx status."""
    status = exchange.status
    assert status is not None
    role = worker.role.value
    if status == 503 and worker is pair[1] and KV_FAILED.encode() in body:
        return AttemptFailed(KV_FAILED, f"{role} worker {worker.url}: {_message(body)}", retryable=True,
                             blame=pair, status=503, error_type=KV_FAILED)
    answer = Response(status, body, exchange.content_type or b"application/json")
    return AttemptFailed(f"{role}_error", f"{role} worker {worker.url} answered HTTP {status}",
                         retryable=status in RETRYABLE_STATUSES, blame=(worker,),
                         counts=status in BREAKER_STATUSES, status=status, answer=answer)


def _message(body: bytes) -> str:
    """The message of an SGLang-style error body, or the body itself."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:200].decode("utf-8", "replace")
    error = payload.get("error") if isinstance(payload, dict) else None
    return str(error.get("message")) if isinstance(error, dict) else body[:200].decode("utf-8", "replace")


def _abort_reason(payload: Any) -> str | None:
    """The abort message of a /generate answer (or event) that ended in an abort with no output, else None."""
    for item in payload if isinstance(payload, list) else (payload,):
        if not isinstance(item, dict):
            continue
        meta = item.get("meta_info")
        reason = meta.get("finish_reason") if isinstance(meta, dict) else None
        if isinstance(reason, dict) and reason.get("type") == "abort" and not item.get("text") \
                and not item.get("output_ids"):
            return str(reason.get("message") or "aborted")
    return None


def aborted(body: bytes, pair: Pair) -> AttemptFailed | None:
    """The failure a decode's 200 answer hides when it ended in an abort with no output, else None."""
    if b'"abort"' not in body:  # the common case costs one substring search
        return None
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    reason = _abort_reason(payload)
    if reason is None:
        return None
    return AttemptFailed(ABORTED, f"decode worker {pair[1].url} aborted the request: {reason}",
                         retryable=True, blame=pair, error_type=ABORTED)


def first_event_failure(event: bytes, pair: Pair) -> AttemptFailed | None:
    """A retryable failure announced by a stream's first event, if it is one."""
    if b'"error"' not in event and b'"abort"' not in event:
        return None
    for line in event.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        try:
            payload = orjson.loads(line[5:])
        except orjson.JSONDecodeError:
            return None
        decode = pair[1]
        error = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(error, dict) and error.get("type") == KV_FAILED:
            return AttemptFailed(KV_FAILED, f"decode worker {decode.url}: {error.get('message')}",
                                 retryable=True, blame=pair, status=503, error_type=KV_FAILED, in_stream=True)
        reason = _abort_reason(payload)
        if reason is not None:
            return AttemptFailed(ABORTED, f"decode worker {decode.url} aborted the request: {reason}",
                                 retryable=True, blame=pair, error_type=ABORTED, in_stream=True)
        return None
    return None
