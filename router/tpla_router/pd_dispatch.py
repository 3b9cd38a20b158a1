"""The PD request path: pick a pair, send the same body to both at once, answer with the decode's reply.

One attempt = one (prefill, decode) pair, one set of bootstrap rooms. An attempt that fails before
any byte reached the client is aborted on both workers and retried on a new pair; once streaming has
started, failures end the stream with an SSE error event instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random

import aiohttp
from aiohttp import web

from .errors import RouterError, error_response
from .logprobs import StreamMerger, merge_response, prefill_prompt_logprobs
from .protocol import PDRequest, Route, parse_request
from .router import Router
from .upstream import Reply
from .worker import Worker

logger = logging.getLogger(__name__)

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_BREAKER_STATUSES = frozenset({500, 502, 503, 504})
_NOT_FORWARDED = frozenset({
    "host", "content-length", "content-type", "accept-encoding", "connection", "keep-alive",
    "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization", "proxy-connection",
})


class _AttemptFailed(Exception):
    def __init__(self, worker: Worker, kind: str, message: str, retryable: bool,
                 upstream: Reply | None = None) -> None:
        super().__init__(message)
        self.worker = worker
        self.kind = kind
        self.message = message
        self.retryable = retryable
        self.upstream = upstream


def _failure(worker: Worker, res: Reply) -> _AttemptFailed:
    role = worker.role.value
    if res.timed_out:
        return _AttemptFailed(worker, "timeout", "request timed out", retryable=False)
    if res.status is None:
        return _AttemptFailed(worker, f"{role}_unreachable", f"{role} worker {worker.url}: {res.error}",
                              retryable=True)
    return _AttemptFailed(worker, f"{role}_error", f"{role} worker {worker.url} answered HTTP {res.status}",
                          retryable=res.status in RETRYABLE_STATUSES, upstream=res)


def _check(worker: Worker, res: Reply) -> None:
    if not res.ok:
        raise _failure(worker, res)


def _settle(task: asyncio.Future[object]) -> None:
    """Cancel a task we no longer need, or mark its exception as seen if it already failed."""
    if not task.done():
        task.cancel()
    elif not task.cancelled():
        task.exception()


def _record(worker: Worker, res: Reply) -> None:
    """Connection failures and server errors count against the breaker; timeouts count for nothing."""
    if res.timed_out:
        return
    if res.status is None or res.status in _BREAKER_STATUSES:
        worker.breaker.record_failure()
    else:
        worker.breaker.record_success()


def forward_headers(request: web.Request) -> dict[str, str]:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED}
    headers["Content-Type"] = "application/json"
    return headers


def _sse_error(message: str) -> bytes:
    return b"data: " + json.dumps({"error": {"message": message}}).encode() + b"\n\ndata: [DONE]\n\n"


class PDDispatcher:
    def __init__(self, router: Router) -> None:
        self._router = router
        self._config = router.config
        self._metrics = router.metrics
        self._rng = random.Random()

    async def handle(self, request: web.Request, route: Route) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        start = loop.time()
        self._metrics.route(route.value).requests.inc()
        try:
            pd = parse_request(route, await request.read(), self._config.max_new_tokens_cap)
            return await self._dispatch(request, pd, start, start + self._config.request_timeout_secs)
        finally:
            self._metrics.route(route.value).duration.observe(loop.time() - start)

    async def _dispatch(self, request: web.Request, pd: PDRequest, start: float,
                        deadline: float) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        headers = forward_headers(request)
        exclude: set[str] = set()
        failure: _AttemptFailed | None = None
        attempts = self._config.retry_max_retries
        made = 0
        for attempt in range(attempts):
            if attempt:
                delay = self._backoff(attempt)
                if loop.time() + delay >= deadline:
                    break
                self._metrics.route(pd.route.value).retries.inc()
                await asyncio.sleep(delay)
            try:
                prefill, decode = self._router.select_pair(pd.routing_key, exclude)
            except RouterError:
                if failure is None:
                    raise
                break
            made += 1
            payload, rids = pd.render(prefill)
            try:
                if pd.stream:
                    return await self._stream(request, pd, prefill, decode, payload, rids, headers, start,
                                              deadline)
                return await self._full(pd, prefill, decode, payload, headers, deadline)
            except _AttemptFailed as f:
                self._router.abort((prefill, decode), rids, headers)
                self._metrics.error(f.kind)
                logger.warning("attempt %d/%d on (%s, %s) failed: %s", attempt + 1, attempts, prefill.url,
                               decode.url, f.message)
                failure = f
                if not f.retryable:
                    break
                exclude.add(f.worker.url)
            except asyncio.CancelledError:
                self._router.abort((prefill, decode), rids, headers)
                self._metrics.error("client_disconnect")
                raise
        assert failure is not None, "the loop runs at least once and returns on success"
        return self._give_up(failure, made)

    def _give_up(self, failure: _AttemptFailed, attempts: int) -> web.Response:
        up = failure.upstream
        if up is not None and up.status is not None and not failure.retryable:
            return web.Response(status=up.status, body=up.body,
                                headers={"Content-Type": up.content_type or "application/json"})
        if failure.kind == "timeout":
            return error_response(504, f"request timed out after {self._config.request_timeout_secs} s")
        status = up.status if up is not None and up.status is not None else 502
        return error_response(status, f"{failure.message} (gave up after {attempts} attempts)")

    def _backoff(self, attempt: int) -> float:
        c = self._config
        ms = min(c.retry_initial_backoff_ms * c.retry_backoff_multiplier ** (attempt - 1), c.retry_max_backoff_ms)
        return ms * (1.0 + c.retry_jitter_factor * self._rng.uniform(-1.0, 1.0)) / 1000.0

    def _timeout(self, deadline: float) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=max(deadline - asyncio.get_running_loop().time(), 1e-3))

    async def _call(self, worker: Worker, path: str, payload: bytes, headers: dict[str, str],
                    deadline: float) -> Reply:
        """POST and read the whole answer; releases the worker's load when done."""
        try:
            async with self._router.session.post(worker.endpoint(path), data=payload, headers=headers,
                                                 timeout=self._timeout(deadline)) as resp:
                res = Reply(resp.status, await resp.read(), resp.headers.get("Content-Type"))
        except asyncio.TimeoutError:
            res = Reply(None, error="timed out", timed_out=True)
        except aiohttp.ClientError as e:
            res = Reply(None, error=f"{type(e).__name__}: {e}")
        finally:
            worker.release()
        _record(worker, res)
        return res

    async def _full(self, pd: PDRequest, prefill: Worker, decode: Worker, payload: bytes,
                    headers: dict[str, str], deadline: float) -> web.Response:
        path = pd.route.value
        tasks = {
            asyncio.ensure_future(self._call(prefill, path, payload, headers, deadline)): prefill,
            asyncio.ensure_future(self._call(decode, path, payload, headers, deadline)): decode,
        }
        results: dict[Worker, Reply] = {}
        try:
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    worker = tasks[task]
                    results[worker] = task.result()
                    _check(worker, results[worker])
        finally:
            for task in tasks:
                task.cancel()
        d_res = results[decode]
        body = d_res.body
        if pd.merge_logprobs:
            body = merge_response(prefill_prompt_logprobs(results[prefill].body), body)
        return web.Response(status=d_res.status, body=body,
                            headers={"Content-Type": d_res.content_type or "application/json"})

    async def _open(self, decode: Worker, path: str, payload: bytes, headers: dict[str, str],
                    deadline: float) -> aiohttp.ClientResponse:
        """POST to the decode worker and return once its status line is in; the body is read later."""
        try:
            resp = await self._router.session.post(decode.endpoint(path), data=payload, headers=headers,
                                                   timeout=self._timeout(deadline))
        except asyncio.TimeoutError:
            raise _failure(decode, Reply(None, timed_out=True)) from None
        except aiohttp.ClientError as e:
            res = Reply(None, error=f"{type(e).__name__}: {e}")
            _record(decode, res)
            raise _failure(decode, res) from e
        if not 200 <= resp.status < 300:
            try:
                body = await resp.read()
            except (aiohttp.ClientError, asyncio.TimeoutError):
                body = b""
            finally:
                resp.release()
            res = Reply(resp.status, body, resp.headers.get("Content-Type"))
            _record(decode, res)
            raise _failure(decode, res)
        return resp

    async def _stream(self, request: web.Request, pd: PDRequest, prefill: Worker, decode: Worker,
                      payload: bytes, rids: list[str], headers: dict[str, str], start: float,
                      deadline: float) -> web.StreamResponse:
        path = pd.route.value
        p_task = asyncio.ensure_future(self._call(prefill, path, payload, headers, deadline))
        d_task = asyncio.ensure_future(self._open(decode, path, payload, headers, deadline))
        resp: aiohttp.ClientResponse | None = None
        committed = False
        try:
            await asyncio.wait((p_task, d_task), return_when=asyncio.FIRST_COMPLETED)
            if p_task.done():
                _check(prefill, p_task.result())
            resp = await d_task
            merger: StreamMerger | None = None
            first = b""
            if pd.merge_logprobs:
                # Prompt logprobs go into the first event, so the prefill's answer is needed first; in
                # PD the decode's first token waits for the prefill anyway.
                p_res = await p_task
                _check(prefill, p_res)
                merger = StreamMerger(prefill_prompt_logprobs(p_res.body))
            else:
                first = await self._first_chunk(resp, prefill, decode, p_task)
            out = web.StreamResponse(status=resp.status, headers={
                "Content-Type": resp.headers.get("Content-Type", "text/event-stream"),
                "Cache-Control": "no-cache",
            })
            await out.prepare(request)
            committed = True
            self._metrics.route(path).first_byte.observe(asyncio.get_running_loop().time() - start)
            await self._pump(out, resp, first, merger, prefill, decode, rids, headers)
            return out
        finally:
            decode.release()
            if resp is None and d_task.done() and not d_task.cancelled() and d_task.exception() is None:
                resp = d_task.result()
            _settle(d_task)
            if resp is not None:
                resp.close()
            if committed and not p_task.done():
                self._router.track(p_task)
            else:
                _settle(p_task)

    async def _first_chunk(self, resp: aiohttp.ClientResponse, prefill: Worker, decode: Worker,
                           p_task: asyncio.Future[Reply]) -> bytes:
        """Wait for the decode's first bytes, retrying instead if the prefill fails before they come."""
        read = asyncio.ensure_future(resp.content.readany())
        try:
            await asyncio.wait((p_task, read), return_when=asyncio.FIRST_COMPLETED)
            if p_task.done():
                _check(prefill, p_task.result())
            return await read
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            res = Reply(None, error=f"{type(e).__name__}: {e}", timed_out=isinstance(e, asyncio.TimeoutError))
            _record(decode, res)
            raise _failure(decode, res) from e
        finally:
            _settle(read)

    async def _pump(self, out: web.StreamResponse, resp: aiohttp.ClientResponse, first: bytes,
                    merger: StreamMerger | None, prefill: Worker, decode: Worker, rids: list[str],
                    headers: dict[str, str]) -> None:
        """Copy the decode's stream to the client chunk by chunk as it arrives."""
        chunk = first
        try:
            while True:
                if chunk:
                    data = merger.feed(chunk) if merger is not None else chunk
                    if data:
                        await out.write(data)
                try:
                    chunk = await resp.content.readany()
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    timed_out = isinstance(e, asyncio.TimeoutError)
                    _record(decode, Reply(None, timed_out=timed_out))
                    self._router.abort((prefill, decode), rids, headers)
                    self._metrics.error("timeout" if timed_out else "decode_stream")
                    reason = "request timed out" if timed_out else f"decode worker {decode.url} stream broke: {e}"
                    await out.write(_sse_error(reason))
                    break
                if not chunk:
                    if merger is not None and (tail := merger.flush()):
                        await out.write(tail)
                    decode.breaker.record_success()
                    break
            await out.write_eof()
        except ConnectionError:
            self._router.abort((prefill, decode), rids, headers)
            self._metrics.error("client_disconnect")
