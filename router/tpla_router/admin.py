"""Adding and removing workers at runtime (SGLang router names: /add_worker, /remove_worker, /list_workers).

Parameters come from the query string or a JSON body: url, worker_type (prefill | decode) and, for
prefill workers, bootstrap_port.
"""

from __future__ import annotations

from typing import Any

import orjson

from .config import Role, WorkerSpec, normalize_url
from .errors import RouterError
from .http import Request, Response, ResponseWriter
from .router import Router


def _json(payload: Any) -> Response:
    return Response(200, orjson.dumps(payload))


def _params(request: Request) -> dict[str, Any]:
    params: dict[str, Any] = request.query()
    if request.body.strip():
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError as e:
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
    if isinstance(value, bool):
        raise RouterError(400, f"bootstrap_port must be an integer or 'none', got {value!r}", "bad_request")
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise RouterError(400, f"bootstrap_port must be an integer or 'none', got {value!r}", "bad_request") from None


class AdminHandlers:
    def __init__(self, router: Router) -> None:
        self._router = router

    async def add_worker(self, request: Request, out: ResponseWriter) -> Response:
        params = _params(request)
        try:
            role = Role(params.get("worker_type"))
        except ValueError:
            raise RouterError(400, "worker_type must be 'prefill' or 'decode'", "bad_request") from None
        try:
            spec = WorkerSpec(params["url"], role, _bootstrap_port(params.get("bootstrap_port")))
        except ValueError as e:
            raise RouterError(400, str(e), "bad_request") from None
        worker = await self._router.add_worker(spec)
        return _json({"added": worker.describe()})

    async def remove_worker(self, request: Request, out: ResponseWriter) -> Response:
        params = _params(request)
        try:
            url = normalize_url(params["url"])
        except ValueError as e:
            raise RouterError(400, str(e), "bad_request") from None
        worker = self._router.remove_worker(url)
        return _json({"removed": worker.describe()})

    async def list_workers(self, request: Request, out: ResponseWriter) -> Response:
        return _json({role.value: [w.describe() for w in pool] for role, pool in self._router.pools.items()})
