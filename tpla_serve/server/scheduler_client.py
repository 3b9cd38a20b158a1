"""The HTTP front's side of the front ↔ scheduler hop.

The front binds a PUSH socket (requests) and a PULL socket (answers) on ipc:// endpoints in a fresh
temporary directory, then spawns the scheduler process, which connects to both, loads the model and its
TP ranks, and reports `Stats({"ready": True, "model_info": ...})` or `RequestError(rid="")` on a failed
start. Answers are routed by rid to the `RequestGroup` of the HTTP request that is waiting for them.

Process hygiene: the scheduler runs in a process group of its own, so a terminal's Ctrl-C reaches only the
front, which then stops the scheduler in order; the front sweeps the group (the TP ranks) when it closes,
and the scheduler ends itself when the front dies.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from tpla_serve.config import ServerConfig
from tpla_serve.server.errors import APIError
from tpla_serve.server.messages import (
    AbortRequest,
    FlushCache,
    GenerateRequest,
    GetStats,
    Message,
    RequestError,
    RequestOutput,
    Stats,
    decode,
    encode,
)
from tpla_serve.server.metrics import RequestTrack, ServerMetrics

logger = logging.getLogger(__name__)

Answer = RequestOutput | RequestError


class RequestGroup:
    """The scheduler requests of one HTTP request: one item, or one per prompt of a batch.

    Answers arrive on `queue` as (item index, message); an item is done after its finished output or
    its error. Each item's answers feed the latency metrics unless the group is the server's own
    (warm-up, /health_generate), which SGLang leaves out of its metrics too.
    """

    def __init__(self, client: SchedulerClient, requests: list[GenerateRequest], log_metrics: bool = True) -> None:
        self._client = client
        self.requests = requests
        self.rids = [r.rid for r in requests]
        self.queue: asyncio.Queue[tuple[int, Answer]] = asyncio.Queue()
        self.done = [False] * len(requests)
        arrival = time.monotonic()
        self.tracks = [RequestTrack(arrival, r.stream) for r in requests] if log_metrics else None

    def __len__(self) -> int:
        return len(self.requests)

    async def get(self) -> tuple[int, Answer]:
        return await self.queue.get()

    def abort(self, message: str) -> None:
        """Abort the items still running; their pages return to the pool."""
        for i, rid in enumerate(self.rids):
            if not self.done[i]:
                self._client.abort(rid, message)

    def deliver(self, index: int, msg: Answer, metrics: ServerMetrics | None) -> None:
        if isinstance(msg, RequestError) or msg.finished:
            self.done[index] = True
        if isinstance(msg, RequestOutput) and metrics is not None and self.tracks is not None:
            metrics.on_output(self.tracks[index], msg, time.monotonic())
        self.queue.put_nowait((index, msg))


class SchedulerClient:
    """Owns the scheduler process and the two sockets to it; one per HTTP front."""

    def __init__(self, config: ServerConfig, metrics: ServerMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.model_info: dict[str, Any] = {}
        self.ready = asyncio.Event()  # the scheduler loaded the model
        self.serving = asyncio.Event()  # and the warm-up request was served (or skipped): /health is 200
        self.failure: str | None = None
        self.on_fatal: Callable[[str], None] | None = None
        self.last_stats: dict[str, Any] = {}
        self._routes: dict[str, tuple[RequestGroup, int]] = {}
        # The scheduler answers GetStats and FlushCache each with one Stats, in order.
        self._stats_waiters: deque[tuple[bool, asyncio.Future[dict[str, Any]]]] = deque()
        self._ipc_dir = Path(tempfile.mkdtemp(prefix="tpla-serve-"))
        self._ctx = zmq.Context()
        self._push = self._ctx.socket(zmq.PUSH)
        self._pull = zmq.asyncio.Context(self._ctx).socket(zmq.PULL)
        for sock in (self._push, self._pull):
            sock.setsockopt(zmq.LINGER, 0)
        self._push.setsockopt(zmq.SNDHWM, 0)
        self._pull.setsockopt(zmq.RCVHWM, 0)
        self.to_scheduler = f"ipc://{self._ipc_dir / 'to_scheduler'}"
        self.from_scheduler = f"ipc://{self._ipc_dir / 'from_scheduler'}"
        self._push.bind(self.to_scheduler)
        self._pull.bind(self.from_scheduler)
        self._proc: mp.process.BaseProcess | None = None
        self._closed = False

    # ------------------------------------------------------------------ process

    def start(self) -> None:
        """Spawn the scheduler; it starts loading the model at once (call before slower front set-up)."""
        ctx = mp.get_context("spawn")
        self._proc = ctx.Process(
            target=scheduler_main,
            args=(self.config, self.to_scheduler, self.from_scheduler, os.getpid()),
            name="tpla-scheduler",
            daemon=False,  # it starts the TP ranks, and daemonic processes may not have children
        )
        self._proc.start()
        logger.info("scheduler process started (pid %d)", self._proc.pid)

    async def run(self) -> None:
        """Receive answers until closed; notices the scheduler's exit through its process sentinel."""
        assert self._proc is not None, "start() first"
        loop = asyncio.get_running_loop()
        exited = loop.create_future()
        loop.add_reader(self._proc.sentinel, lambda: exited.done() or exited.set_result(None))
        receiving = asyncio.ensure_future(self._receive_loop())
        try:
            await asyncio.wait({receiving, exited}, return_when=asyncio.FIRST_COMPLETED)
            if exited.done() and not self._closed:
                await asyncio.sleep(0.1)  # answers sent just before the exit still arrive first
                self.fail(f"the scheduler process exited unexpectedly (exit code {self._proc.exitcode})")
        finally:
            loop.remove_reader(self._proc.sentinel)
            receiving.cancel()

    async def _receive_loop(self) -> None:
        while True:
            data = await self._pull.recv()
            try:
                msg = decode(data)
            except (ValueError, TypeError) as e:
                logger.error("dropping a malformed message from the scheduler: %s", e)
                continue
            self._dispatch(msg)

    def _dispatch(self, msg: Message) -> None:
        if isinstance(msg, Stats):
            self._on_stats(msg.data)
        elif isinstance(msg, (RequestOutput, RequestError)) and msg.rid:
            route = self._routes.get(msg.rid)
            if route is None:
                logger.debug("answer for unknown or abandoned request %s", msg.rid)
                return
            group, index = route
            if isinstance(msg, RequestError) or msg.finished:
                del self._routes[msg.rid]
            group.deliver(index, msg, self.metrics)
        elif isinstance(msg, RequestError):
            self.fail(msg.message)
        else:
            logger.error("unexpected message from the scheduler: %s", type(msg).__name__)

    def _on_stats(self, data: dict[str, Any]) -> None:
        if not self.ready.is_set():
            if data.get("ready"):
                self.model_info = dict(data.get("model_info") or {})
                self.last_stats = data
                self.ready.set()
                logger.info("the scheduler is ready: %s", self.model_info)
            return
        if not self._stats_waiters:
            logger.warning("unexpected Stats from the scheduler: %s", data)
            return
        is_snapshot, waiter = self._stats_waiters.popleft()
        if is_snapshot:
            self.last_stats = data
        if not waiter.done():
            waiter.set_result(data)

    def fail(self, message: str) -> None:
        """The server cannot serve (the scheduler is gone or broken, or the warm-up failed): fail every
        waiting request and tell the server to stop."""
        if self.failure is not None:
            return
        self.failure = message
        logger.error("%s", message)
        for rid, (group, index) in list(self._routes.items()):
            group.deliver(index, RequestError(rid, 503, message), self.metrics)
        self._routes.clear()
        for _, waiter in self._stats_waiters:
            if not waiter.done():
                waiter.set_exception(APIError(503, message))
        self._stats_waiters.clear()
        if self.on_fatal is not None:
            self.on_fatal(message)

    # ------------------------------------------------------------------ requests

    def _send(self, msg: Message) -> None:
        try:
            self._push.send(encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            raise APIError(503, "the scheduler is not connected") from None

    def check_loaded(self) -> None:
        """Raise the 503 that says why nothing can run yet (loading, or the scheduler died)."""
        if self.failure is not None:
            raise APIError(503, self.failure)
        if not self.ready.is_set():
            raise APIError(503, "the server is starting: the model is still loading")

    def check_available(self) -> None:
        """Raise the 503 that says why requests cannot be served now (starting, or the scheduler died)."""
        self.check_loaded()
        if not self.serving.is_set():
            raise APIError(503, "the server is starting: the model is loaded, its warm-up request is running")

    def in_flight(self, rid: str) -> bool:
        return rid in self._routes

    def in_flight_rids(self) -> list[str]:
        return list(self._routes)

    def submit(self, requests: list[GenerateRequest], log_metrics: bool = True, starting: bool = False
               ) -> RequestGroup:
        """Queue one HTTP request's scheduler requests; rids must not be in flight already.

        log_metrics: False for the server's own requests (warm-up, /health_generate). starting: the
        warm-up, which runs once the model is loaded, before the server reports ready.
        """
        if starting:
            self.check_loaded()
        else:
            self.check_available()
        for r in requests:
            if r.rid in self._routes:
                raise APIError(400, f"rid {r.rid!r} is already in use by a running request", param="rid")
        group = RequestGroup(self, requests, log_metrics)
        for i, r in enumerate(requests):
            self._routes[r.rid] = (group, i)
        try:
            for r in requests:
                self._send(r)
        except APIError:
            for r in requests:
                self._routes.pop(r.rid, None)
            raise
        return group

    def abort(self, rid: str, message: str = "aborted by request") -> None:
        """Ask the scheduler to end a request; its final answer still arrives and is routed as usual."""
        if self.failure is not None or self._closed:
            return
        try:
            self._send(AbortRequest(rid, message))
        except APIError:
            logger.warning("could not send the abort of %s: the scheduler is not connected", rid)

    async def _ask(self, msg: GetStats | FlushCache, timeout: float) -> dict[str, Any]:
        self.check_loaded()
        waiter = asyncio.get_running_loop().create_future()
        self._send(msg)
        self._stats_waiters.append((isinstance(msg, GetStats), waiter))
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except asyncio.TimeoutError:
            name = type(msg).__name__
            raise APIError(503, f"the scheduler did not answer {name} within {timeout:g} s") from None

    async def stats(self, timeout: float = 10.0) -> dict[str, Any]:
        """A fresh snapshot of the scheduler's state (queue, pages, counters)."""
        return await self._ask(GetStats(), timeout)

    async def flush_cache(self, timeout: float = 30.0) -> dict[str, Any]:
        return await self._ask(FlushCache(), timeout)

    # ------------------------------------------------------------------ shutdown

    def close(self, timeout: float = 15.0) -> None:
        """Stop the scheduler (SIGTERM, then SIGKILL after `timeout`), sweep its TP ranks, drop sockets."""
        if self._closed:
            return
        self._closed = True
        proc = self._proc
        if proc is not None:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout)
            _sweep_process_group(proc.pid, grace=5.0 if proc.exitcode is not None else 0.0)
            proc.join(1.0)
        self._push.close()
        self._pull.close()
        self._ctx.term()
        shutil.rmtree(self._ipc_dir, ignore_errors=True)


def _sweep_process_group(pgid: int | None, grace: float) -> None:
    """Wait up to `grace` seconds for the group's members (TP ranks) to leave, then kill the rest."""
    if pgid is None:
        return
    deadline = time.monotonic() + grace
    while True:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    logger.warning("killing what is left of the scheduler's process group %d", pgid)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------------- scheduler side


def _watch_front(front_pid: int, grace: float = 15.0) -> None:
    """End this process when the front dies; kill the whole group if a clean exit takes too long."""
    while os.getppid() == front_pid:
        time.sleep(0.5)
    logger.error("the HTTP front (pid %d) is gone: stopping the scheduler", front_pid)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace)
    os.killpg(0, signal.SIGKILL)


def scheduler_main(config: ServerConfig, to_scheduler: str, from_scheduler: str, front_pid: int) -> None:
    """Entry point of the spawned scheduler process: its own process group, watched by a thread that
    stops it (SIGTERM, which run_scheduler_process turns into a clean exit) if the front dies."""
    os.setpgrp()
    threading.Thread(target=_watch_front, args=(front_pid,), name="watch-front", daemon=True).start()
    from tpla_serve.server.scheduler_process import run_scheduler_process

    run_scheduler_process(config, to_scheduler, from_scheduler)

