"""Adding and removing workers at runtime (SGLang router names: /add_worker, /remove_worker, /list_workers).

Parameters come from the query string or a JSON body: url, worker_type (prefill | decode) and, for
prefill workers, bootstrap_port.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from .config import Role, WorkerSpec, normalize_url
from .errors import RouterError
from .router import Router


async def _params(request: web.Request) -> dict[str, Any]:
    params: dict[str, Any] = dict(request.query)
    raw = await request.read()
    if raw.strip():
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RouterError(400, f"request body is not valid JSON: {e}", "bad_request") from None
        if not isinstance(body, dict):
            raise RouterError(400, "request body must be a JSON object", "bad_request")
        params.update(body)
    if not isinstance(params.get("url"), str):
        raise RouterError(400, "url is required", "bad_request")
    return params


def _bootstrap_port(value: Any) -> int | None:
    if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise RouterError(400, f"bootstrap_port must be an integer or 'none', got {value!r}", "bad_request") from None


class AdminHandlers:
    def __init__(self, router: Router) -> None:
        self._router = router

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/add_worker", self.add_worker)
        app.router.add_post("/remove_worker", self.remove_worker)
        app.router.add_get("/list_workers", self.list_workers)

    async def add_worker(self, request: web.Request) -> web.Response:
        params = await _params(request)
        try:
            role = Role(params.get("worker_type"))
        except ValueError:
            raise RouterError(400, "worker_type must be 'prefill' or 'decode'", "bad_request") from None
        try:
            spec = WorkerSpec(params["url"], role, _bootstrap_port(params.get("bootstrap_port")))
        except ValueError as e:
            raise RouterError(400, str(e), "bad_request") from None
        worker = await self._router.add_worker(spec)
        return web.json_response({"added": worker.describe()})

    async def remove_worker(self, request: web.Request) -> web.Response:
        params = await _params(request)
        try:
            url = normalize_url(params["url"])
        except ValueError as e:
            raise RouterError(400, str(e), "bad_request") from None
        worker = self._router.remove_worker(url)
        return web.json_response({"removed": worker.describe()})

    async def list_workers(self, request: web.Request) -> web.Response:
        return web.json_response(
            {role.value: [w.describe() for w in pool] for role, pool in self._router.pools.items()})
