"""Endpoints about the cluster rather than one generation: health, model and server info, cache, metrics."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from .config import Role
from .errors import error_response
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .pd_dispatch import forward_headers
from .router import Router
from .upstream import Reply
from .worker import Worker


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.json_response(payload, status=status)


def _parsed(reply: Reply) -> Any:
    try:
        return json.loads(reply.body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return reply.body.decode(errors="replace")


def _outcome(worker: Worker, reply: Reply, key: str) -> dict[str, Any]:
    entry: dict[str, Any] = worker.describe()
    if reply.ok:
        entry[key] = _parsed(reply)
    else:
        entry["error"] = reply.error if reply.status is None else f"HTTP {reply.status}: {_parsed(reply)}"
    return entry


class InfoHandlers:
    def __init__(self, router: Router) -> None:
        self._router = router

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/health", self.health)
        app.router.add_get("/health_generate", self.health_generate)
        for path in ("/v1/models", "/model_info", "/get_model_info"):
            app.router.add_get(path, self.from_one_worker)
        for path in ("/server_info", "/get_server_info"):
            app.router.add_get(path, self.server_info)
        app.router.add_route("GET", "/flush_cache", self.flush_cache)
        app.router.add_route("POST", "/flush_cache", self.flush_cache)
        app.router.add_get("/metrics", self.metrics)

    async def _fan_out(self, workers: list[Worker], method: str, path: str, request: web.Request,
                       timeout_secs: float | None = None) -> list[Reply]:
        headers = forward_headers(request)
        return list(await asyncio.gather(
            *(self._router.fetch(w.url, method, path, headers, timeout_secs) for w in workers)))

    async def health(self, request: web.Request) -> web.Response:
        """Ready when at least one prefill and one decode worker can take traffic."""
        summary: dict[str, Any] = {}
        for role, pool in self._router.pools.items():
            summary[role.value] = {"available": sum(w.available for w in pool), "total": len(pool)}
        ready = all(s["available"] > 0 for s in summary.values())
        return _json({"status": "ok" if ready else "unavailable", **summary}, 200 if ready else 503)

    async def health_generate(self, request: web.Request) -> web.Response:
        """Every available worker must pass its own /health_generate."""
        workers = [w for w in self._router.workers() if w.available]
        replies = await self._fan_out(workers, "GET", "/health_generate", request,
                                      self._router.config.request_timeout_secs)
        roles = {w.role for w in workers}
        ok = roles == set(Role) and all(r.ok for r in replies)
        body = {"status": "ok" if ok else "unhealthy",
                "workers": [_outcome(w, r, "response") for w, r in zip(workers, replies)]}
        return _json(body, 200 if ok else 503)

    async def from_one_worker(self, request: web.Request) -> web.Response:
        """Model-level facts are the same on every worker: ask decode workers first, then prefill."""
        candidates = [w for role in (Role.DECODE, Role.PREFILL) for w in self._router.pools[role] if w.available]
        headers = forward_headers(request)
        last = "no available worker"
        for worker in candidates:
            reply = await self._router.fetch(worker.url, "GET", request.path, headers)
            if reply.ok:
                return web.Response(body=reply.body,
                                    headers={"Content-Type": reply.content_type or "application/json"})
            last = f"{worker.url}: {reply.error or f'HTTP {reply.status}'}"
        return error_response(503, f"no worker answered {request.path} ({last})")

    async def server_info(self, request: web.Request) -> web.Response:
        """Each worker's own server info, grouped by role, beside the router's settings."""
        workers = list(self._router.workers())
        replies = await self._fan_out(workers, "GET", request.path, request)
        config = self._router.config
        body: dict[str, Any] = {
            "router": {
                "prefill_policy": config.effective_prefill_policy,
                "decode_policy": config.effective_decode_policy,
                "request_timeout_secs": config.request_timeout_secs,
                "retry_max_retries": config.retry_max_retries,
                "max_new_tokens_cap": config.max_new_tokens_cap,
            },
            Role.PREFILL.value: [],
            Role.DECODE.value: [],
        }
        for worker, reply in zip(workers, replies):
            body[worker.role.value].append(_outcome(worker, reply, "server_info"))
        return _json(body)

    async def flush_cache(self, request: web.Request) -> web.Response:
        workers = list(self._router.workers())
        replies = await self._fan_out(workers, "POST", "/flush_cache", request)
        ok = all(r.ok for r in replies)
        body = {"status": "ok" if ok else "failed",
                "workers": [_outcome(w, r, "response") for w, r in zip(workers, replies)]}
        return _json(body, 200 if ok else 500)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self._router.metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})
