"""Waiting for a RequestGroup's answers: all at once (JSON replies) or as they come (SSE streams).

Every way out of a wait that leaves items running — a client that disconnects, a failed item of a batch,
a stream closed early, a server shutting down — aborts those items, so their KV pages return to the pool.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Request

from tpla_serve.server.errors import APIError
from tpla_serve.server.messages import RequestError
from tpla_serve.server.scheduler_client import Answer, RequestGroup

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ClientDisconnected(Exception):
    pass


def sse(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _output(msg: Answer) -> dict[str, Any]:
    """The output dict, or the APIError the answer means.

    An abort whose finish_reason carries an HTTP `status_code` (SGLang's convention) is that HTTP error;
    other aborts (by /abort_request) are ordinary outputs with finish_reason type "abort".
    """
    if isinstance(msg, RequestError):
        raise APIError(msg.status, msg.message)
    reason = msg.output.get("meta_info", {}).get("finish_reason") or {}
    status = reason.get("status_code") if isinstance(reason, dict) else None
    if msg.finished and reason.get("type") == "abort" and isinstance(status, int) and status >= 400:
        err_type = reason.get("err_type")
        raise APIError(status, str(reason.get("message", "the request was aborted")),
                       err_type if isinstance(err_type, str) else None)
    return msg.output


async def _next(group: RequestGroup, disconnect: asyncio.Future[None]) -> tuple[int, Answer]:
    answer = asyncio.ensure_future(group.get())
    await asyncio.wait({answer, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    if not answer.done():
        answer.cancel()
        raise ClientDisconnected
    return answer.result()


@asynccontextmanager
async def _watching(group: RequestGroup, request: Request | None) -> AsyncIterator[asyncio.Future[None]]:
    """A future that completes when the client disconnects (never, for the server's own requests, which
    have no client); leaving early aborts the unfinished items."""
    if request is None:
        disconnect: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    else:
        disconnect = asyncio.ensure_future(_wait_disconnect(request))
    try:
        yield disconnect
    except ClientDisconnected:
        group.abort("the client disconnected")
        raise
    except APIError as e:
        group.abort(f"another request of the batch failed: {e.message}")
        raise
    except BaseException:
        group.abort("the server stopped waiting for the request")
        raise
    finally:
        disconnect.cancel()


async def collect(group: RequestGroup, request: Request | None) -> list[dict[str, Any]]:
    """The final output of every item, in order (request: the HTTP request to watch, None for none)."""
    results: list[dict[str, Any] | None] = [None] * len(group)
    async with _watching(group, request) as disconnect:
        while any(r is None for r in results):
            index, msg = await _next(group, disconnect)
            output = _output(msg)
            if isinstance(msg, RequestError) or msg.finished:
                results[index] = output
    return results  # type: ignore[return-value]


async def first_answer(group: RequestGroup, request: Request) -> tuple[int, Answer]:
    """A stream's first answer, awaited before any byte is sent so an early error keeps its HTTP status."""
    async with _watching(group, request) as disconnect:
        index, msg = await _next(group, disconnect)
        _output(msg)
    return index, msg


async def stream_answers(
    group: RequestGroup, first: tuple[int, Answer]
) -> AsyncIterator[tuple[int, dict[str, Any], bool]]:
    """(item index, cumulative output, finished) as they arrive, starting with `first`.

    Raises APIError for a failed item. A stream the server stops reading (client gone) aborts the rest.
    """
    try:
        index, msg = first
        while True:
            output = _output(msg)
            finished = isinstance(msg, RequestError) or msg.finished
            yield index, output, finished
            if all(group.done) and group.queue.empty():
                return
            index, msg = await group.get()
    finally:
        group.abort("the stream ended before the request finished")
