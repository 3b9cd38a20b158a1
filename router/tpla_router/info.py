"""Endpoints about the cluster rather than one generation: health, model and server info, cache, metrics."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from .config import Role
from .errors import error_response
from .http import Request, Response, ResponseWriter
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .router import Router
from .upstream import Reply
from .worker import Worker


def _json(payload: Any, status: int = 200) -> Response:
    return Response(status, orjson.dumps(payload))


def _parsed(reply: Reply) -> Any:
    try:
        return orjson.loads(reply.body)
    except orjson.JSONDecodeError:
        return reply.body.decode(errors="replace")


def _outcome(worker: Worker, reply: Reply, key: str) -> dict[str, Any]:
    entry: dict[str, Any] = worker.describe()
    if reply.ok:
        entry[key] = _parsed(reply)
    else:
        entry["error"] = reply.error if reply.status is None else f"HTTP {reply.status}: {_parsed(reply)}"
    return entry


def _client_error(reply: Reply) -> bool:
    """A definitive 4xx about the request (not 408 or 429, which say to try again)."""
    return reply.status is not None and 400 <= reply.status < 500 and reply.status not in (408, 429)


class InfoHandlers:
    def __init__(self, router: Router) -> None:
        self._router = router

    async def _fan_out(self, workers: list[Worker], method: str, path: str,
                       timeout_secs: float | None = None, body: bytes = b"") -> list[Reply]:
        return list(await asyncio.gather(*(self._router.fetch(w, method, path, timeout_secs, body)
                                           for w in workers)))

    async def health(self, request: Request, out: ResponseWriter) -> Response:
        """Ready when at least one prefill and one decode worker can take traffic."""
        summary: dict[str, Any] = {}
        for role, pool in self._router.pools.items():
            summary[role.value] = {"available": sum(w.available for w in pool), "total": len(pool)}
        ready = all(s["available"] > 0 for s in summary.values())
        return _json({"status": "ok" if ready else "unavailable", **summary}, 200 if ready else 503)

    async def health_generate(self, request: Request, out: ResponseWriter) -> Response:
        """Every available worker must pass its own /health_generate."""
        workers = [w for w in self._router.workers() if w.available]
        replies = await self._fan_out(workers, "GET", "/health_generate", self._router.config.request_timeout_secs)
        roles = {w.role for w in workers}
        ok = roles == set(Role) and all(r.ok for r in replies)
        body = {"status": "ok" if ok else "unhealthy",
                "workers": [_outcome(w, r, "response") for w, r in zip(workers, replies)]}
        return _json(body, 200 if ok else 503)

    async def from_one_worker(self, request: Request, out: ResponseWriter) -> Response:
        """Model-level facts are the same on every worker: ask decode workers first, then prefill. A worker's
        answer that the request itself is wrong (a 4xx such as an unknown model's 404) is the answer."""
        candidates = [w for role in (Role.DECODE, Role.PREFILL) for w in self._router.pools[role] if w.available]
        last = "no available worker"
        for worker in candidates:
            reply = await self._router.fetch(worker, "GET", request.path)
            if reply.ok or _client_error(reply):
                return Response(reply.status or 200, reply.body, reply.content_type or b"application/json")
            last = f"{worker.url}: {reply.error or f'HTTP {reply.status}'}"
        return error_response(503, f"no worker answered {request.path} ({last})")

    async def concate_and_append(self, request: Request, out: ResponseWriter) -> Response:
        """SGLang's frontend joins forked states here; every worker is told, as for /flush_cache."""
        workers = list(self._router.workers())
        replies = await self._fan_out(workers, "POST", request.path, body=request.body)
        refused = next((r for r in replies if _client_error(r)), None)
        if refused is not None:
            return Response(refused.status or 400, refused.body, refused.content_type or b"application/json")
        failed = [(w, r) for w, r in zip(workers, replies) if not r.ok]
        if failed:
            worker, reply = failed[0]
            return error_response(502, f"worker {worker.url} failed {request.path}: "
                                       f"{reply.error or f'HTTP {reply.status}'}")
        return _json({"success": True, "workers": [_outcome(w, r, "response") for w, r in zip(workers, replies)]})

    async def server_info(self, request: Request, out: ResponseWriter) -> Response:
        """Each worker's own server info, grouped by role, beside the router's settings."""
        workers = list(self._router.workers())
        replies = await self._fan_out(workers, "GET", request.path)
        config = self._router.config
        body: dict[str, Any] = {
            "router": {
                "prefill_policy": config.effective_prefill_policy,
                "decode_policy": config.effective_decode_policy,
                "request_timeout_secs": config.request_timeout_secs,
                "retry_max_retries": config.retry_max_retries,
                "max_new_tokens_cap": config.max_new_tokens_cap,
                "max_payload_size": config.max_payload_size,
            },
            Role.PREFILL.value: [],
            Role.DECODE.value: [],
        }
        for worker, reply in zip(workers, replies):
            body[worker.role.value].append(_outcome(worker, reply, "server_info"))
        return _json(body)

    async def flush_cache(self, request: Request, out: ResponseWriter) -> Response:
        workers = list(self._router.workers())
        replies = await self._fan_out(workers, "POST", "/flush_cache")
        ok = all(r.ok for r in replies)
        body = {"status": "ok" if ok else "failed",
                "workers": [_outcome(w, r, "response") for w, r in zip(workers, replies)]}
        return _json(body, 200 if ok else 502)

    async def metrics(self, request: Request, out: ResponseWriter) -> Response:
        return Response(200, self._router.metrics.render(), METRICS_CONTENT_TYPE.encode())
