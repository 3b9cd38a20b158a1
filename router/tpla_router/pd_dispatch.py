"""The PD request path: pick a pair, send the same body to both at once, answer with the decode's reply.

One attempt = one (prefill, decode) pair and one set of bootstrap rooms. An attempt that fails before
any byte reached the client is aborted on both workers and retried on a new pair: a worker that
cannot be reached, 408/429/5xx from either, and a decode whose KV transfer failed (503 with
`kv_transfer_failed`, as its status or as its first SSE event) or that answers an abort with no
output. Once streaming has started, a failure ends the stream with an SSE error event instead.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import secrets

from .errors import RouterError, error_response, sse_error
from .failures import AttemptFailed, Pair, aborted, first_event_failure, lost, refused
from .http import Body, Request, Response, ResponseWriter, UpstreamError, UpstreamResponse, UpstreamTimeout
from .logprobs import StreamMerger, merge_response, prefill_prompt_logprobs
from .protocol import PDRequest, Route, parse_request
from .router import Router
from .worker import Lease, Worker

logger = logging.getLogger(__name__)

_SSE_HEADERS = ((b"Cache-Control", b"no-cache"),)
_FIRST_EVENT_LIMIT = 64 << 10  # bytes of a stream held back while waiting for its first event to end
_POST = b"POST"


def _failed(future: asyncio.Future[None]) -> bool:
    return future.done() and (future.cancelled() or future.exception() is not None)


async def _until(main: asyncio.Future[None], watched: asyncio.Future[None]) -> None:
    """Wait until `main` is done or `watched` fails, whichever comes first; never raises their errors."""
    if main.done() or _failed(watched):
        return
    waiter = asyncio.get_running_loop().create_future()

    def wake(future: asyncio.Future[None]) -> None:
        if not waiter.done() and (future is main or future.cancelled() or future.exception() is not None):
            waiter.set_result(None)

    main.add_done_callback(wake)
    watched.add_done_callback(wake)
    try:
        await waiter
    finally:
        main.remove_done_callback(wake)
        watched.remove_done_callback(wake)


class PDDispatcher:
    def __init__(self, router: Router) -> None:
        self._router = router
        self._config = router.config
        self._metrics = router.metrics
        self._rng = random.Random()
        # rids: unique per attempt; the random prefix keeps several routers in front of one worker apart
        self._rid_prefix = secrets.token_hex(6)
        self._rid_count = itertools.count()

    async def handle(self, request: Request, out: ResponseWriter, route: Route) -> Response | None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        metrics = self._metrics.route(route.value)
        metrics.requests.inc()
        try:
            pd = parse_request(route, request.body, self._config.max_new_tokens_cap)
            return await self._dispatch(pd, out, start, start + self._config.request_timeout_secs)
        finally:
            metrics.duration.observe(loop.time() - start)

    async def _dispatch(self, pd: PDRequest, out: ResponseWriter, start: float,
                        deadline: float) -> Response | None:
        loop = asyncio.get_running_loop()
        exclude: set[str] = set()
        failure: AttemptFailed | None = None
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
                p_lease, d_lease = self._router.select_pair(pd.routing_key, exclude)
            except RouterError:
                if failure is None:
                    raise
                break
            made += 1
            prefill, decode = p_lease.worker, d_lease.worker
            rids: list[str] = []
            try:
                payload, rids = pd.render(prefill, f"{self._rid_prefix}-{next(self._rid_count)}")
                if pd.stream:
                    return await self._stream(pd, p_lease, d_lease, payload, rids, out, start, deadline)
                return await self._full(pd, p_lease, d_lease, payload, deadline)
            except AttemptFailed as f:
                self._router.abort((prefill, decode), rids)
                self._metrics.error(f.kind)
                for worker in f.blame:
                    if f.counts:
                        worker.breaker.record_failure()
                    if f.unreachable:
                        self._router.health.poke(worker)
                logger.warning("attempt %d/%d on (%s, %s) failed: %s", attempt + 1, attempts, prefill.url,
                               decode.url, f.message)
                failure = f
                if not f.retryable:
                    break
                exclude.update(w.url for w in f.blame)
            except asyncio.CancelledError:
                self._router.abort((prefill, decode), rids)
                self._metrics.error("client_disconnect")
                raise
            finally:
                p_lease.release()
                d_lease.release()
        assert failure is not None, "the loop runs at least once and returns on success"
        return self._give_up(failure, made, out)

    def _give_up(self, failure: AttemptFailed, attempts: int, out: ResponseWriter) -> Response | None:
        if failure.kind == "timeout":
            return error_response(504, f"request timed out after {self._config.request_timeout_secs} s")
        if failure.answer is not None and not failure.retryable:
            return failure.answer
        message = f"{failure.message} (gave up after {attempts} attempts)"
        if failure.in_stream:
            out.start(200, b"text/event-stream", _SSE_HEADERS)
            out.end(sse_error(failure.status, message, failure.error_type))
            return None
        return error_response(failure.status, message, failure.error_type)

    def _backoff(self, attempt: int) -> float:
        c = self._config
        ms = min(c.retry_initial_backoff_ms * c.retry_backoff_multiplier ** (attempt - 1), c.retry_max_backoff_ms)
        return ms * (1.0 + c.retry_jitter_factor * self._rng.uniform(-1.0, 1.0)) / 1000.0

    def _check_prefill(self, p: UpstreamResponse, pair: Pair) -> None:
        """Raise if the prefill's (finished) exchange failed or answered non-2xx."""
        ready = p.ready
        if ready.cancelled():
            raise lost(pair[0], UpstreamError("the exchange was cancelled"))
        error = ready.exception()
        if error is not None:
            assert isinstance(error, UpstreamError)
            raise lost(pair[0], error)
        if not 200 <= (p.status or 0) < 300:
            raise refused(pair[0], p, p.body(), pair)

    async def _full(self, pd: PDRequest, p_lease: Lease, d_lease: Lease, payload: Body,
                    deadline: float) -> Response:
        prefill, decode = pair = p_lease.worker, d_lease.worker
        path = pd.route.path_bytes
        p = prefill.upstream.send(_POST, path, payload, deadline)
        d = decode.upstream.send(_POST, path, payload, deadline)
        p.ready.add_done_callback(p_lease.release)
        try:
            await _until(d.ready, p.ready)  # the decode's answer, unless the prefill fails first
            if p.ready.done():
                self._check_prefill(p, pair)
            error = d.ready.exception()
            if error is not None:
                assert isinstance(error, UpstreamError)
                raise lost(decode, error)
            body = d.body()
            if not 200 <= (d.status or 0) < 300:
                raise refused(decode, d, body, pair)
            failure = aborted(body, pair)
            if failure is not None:
                raise failure
            await _until(p.ready, d.ready)
            self._check_prefill(p, pair)
        finally:
            p.close()
            d.close()
        prefill.breaker.record_success()
        decode.breaker.record_success()
        if pd.merge_logprobs:
            body = merge_response(prefill_prompt_logprobs(p.body()), body)
        return Response(d.status or 200, body, d.content_type or b"application/json")

    async def _stream(self, pd: PDRequest, p_lease: Lease, d_lease: Lease, payload: Body, rids: list[str],
                      out: ResponseWriter, start: float, deadline: float) -> None:
        prefill, decode = pair = p_lease.worker, d_lease.worker
        path = pd.route.path_bytes
        p = prefill.upstream.send(_POST, path, payload, deadline)
        d = decode.upstream.send(_POST, path, payload, deadline, stream=True)
        p.ready.add_done_callback(p_lease.release)
        committed = False
        try:
            await _until(d.ready, p.ready)
            if p.ready.done():
                self._check_prefill(p, pair)
            error = d.ready.exception()
            if error is not None:
                assert isinstance(error, UpstreamError)
                raise lost(decode, error)
            if not 200 <= (d.status or 0) < 300:
                raise refused(decode, d, await self._rest(d, decode), pair)
            merger: StreamMerger | None = None
            if pd.merge_logprobs:
                # Prompt logprobs go into the first event, so the prefill's answer is needed first; in
                # PD the decode's first token waits for the prefill anyway.
                await _until(p.ready, d.ready)
                self._check_prefill(p, pair)
                merger = StreamMerger(prefill_prompt_logprobs(p.body()))
            first = await self._first_event(d, p, pair)
            failure = first_event_failure(first, pair)
            if failure is not None:
                raise failure
            out.start(d.status or 200, d.content_type or b"text/event-stream", _SSE_HEADERS)
            committed = True
            self._metrics.route(pd.route.value).first_byte.observe(asyncio.get_running_loop().time() - start)
            if p.ready.done() and not _failed(p.ready):
                prefill.breaker.record_success()
            await self._pump(out, d, first, merger, pair, rids)
        finally:
            d.close()
            d_lease.release()
            if committed:
                p.detach()
            else:
                p.close()

    async def _rest(self, d: UpstreamResponse, decode: Worker) -> bytes:
        """The whole body of a streamed exchange (an error answer)."""
        chunks = []
        try:
            while chunk := await d.read():
                chunks.append(chunk)
        except UpstreamError as e:
            raise lost(decode, e) from None
        return b"".join(chunks)

    async def _first_event(self, d: UpstreamResponse, p: UpstreamResponse,
                           pair: Pair) -> bytes:
        """The decode's stream up to the end of its first event, failing early if the prefill fails."""
        buffered = b""
        while b"\n\n" not in buffered and len(buffered) < _FIRST_EVENT_LIMIT:
            await _until(d.data_ready(), p.ready)
            if p.ready.done():
                self._check_prefill(p, pair)
            try:
                chunk = d.read_nowait()
            except UpstreamError as e:
                raise lost(pair[1], e) from None
            if chunk == b"":
                break
            if chunk is not None:
                buffered += chunk
        return buffered

    async def _pump(self, out: ResponseWriter, d: UpstreamResponse, first: bytes, merger: StreamMerger | None,
                    pair: Pair, rids: list[str]) -> None:
        """Copy the decode's stream to the client as it arrives (what arrived together goes out together,
        and the last bytes go out with the end of the answer)."""
        decode = pair[1]
        pending = first
        try:
            while True:
                try:
                    more = d.read_nowait()
                except UpstreamError as e:
                    await out.write(merger.feed(pending) if merger is not None else pending)
                    self._stream_broke(out, e, pair, rids)
                    return
                if more is None:
                    if pending:
                        await out.write(merger.feed(pending) if merger is not None else pending)
                        pending = b""
                    await d.data_ready()
                elif more:
                    pending += more
                else:
                    if merger is not None:
                        pending = merger.feed(pending) + merger.flush()
                    out.end(pending)
                    decode.breaker.record_success()
                    return
        except ConnectionError:
            self._router.abort(pair, rids)
            self._metrics.error("client_disconnect")

    def _stream_broke(self, out: ResponseWriter, error: UpstreamError, pair: Pair,
                      rids: list[str]) -> None:
        """End a stream the decode stopped feeding with an error event."""
        decode = pair[1]
        timed_out = isinstance(error, UpstreamTimeout)
        if not timed_out:
            decode.breaker.record_failure()
            self._router.health.poke(decode)
        self._router.abort(pair, rids)
        self._metrics.error("timeout" if timed_out else "decode_stream")
        reason = "request timed out" if timed_out else f"decode worker {decode.url} stream broke: {error}"
        out.end(sse_error(504 if timed_out else 502, reason))
