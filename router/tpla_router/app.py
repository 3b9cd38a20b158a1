"""The router's application: its route table, who may call what, the error shape, and `run`.

Access: /health and /openapi.json are open. With an API key every other route needs
`Authorization: Bearer KEY`. Without one, the admin routes (/add_worker, /remove_worker, which
decide where prompts go) serve only when the router listens on loopback or was started with
--enable-admin; elsewhere they answer 403.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
from functools import partial

import orjson

from . import openapi
from .admin import AdminHandlers
from .config import RouterConfig
from .errors import RouterError, error_body, error_response
from .http import HttpServer, Request, Response, ResponseWriter, ServerLimits
from .info import InfoHandlers
from .pd_dispatch import PDDispatcher
from .protocol import Route
from .router import Router
from .routes import Access, RouteSpec

logger = logging.getLogger(__name__)

_SHUTDOWN_GRACE_SECS = 5.0
MODEL_CARD = "/v1/models/{model}"


class RouterApp:
    """Dispatches requests by (method, path) after the access check; turns RouterErrors into answers."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.router = Router(config)
        self.routes = self._routes()
        self._table = {(spec.method.encode(), spec.path): spec for spec in self.routes if not spec.path_params}
        # Paths with a parameter in their last segment, matched by the prefix before it.
        self._templates = [(spec.method.encode(), spec.path.rsplit("{", 1)[0], spec)
                           for spec in self.routes if spec.path_params]
        self._methods: dict[str, list[str]] = {}
        for spec in self.routes:
            self._methods.setdefault(spec.path, []).append(spec.method)
        self._expected = None if config.api_key is None else f"Bearer {config.api_key}".encode()
        self._openapi = orjson.dumps(openapi.document(self.routes))

    def _routes(self) -> list[RouteSpec]:
        dispatcher = PDDispatcher(self.router)
        info = InfoHandlers(self.router)
        admin = AdminHandlers(self.router)
        routes = [
            RouteSpec("POST", Route.GENERATE.value, partial(dispatcher.handle, route=Route.GENERATE),
                      "Generate (SGLang native API), single or batched; SSE when stream is true",
                      body_schema="GenerateRequest"),
            RouteSpec("POST", Route.COMPLETIONS.value, partial(dispatcher.handle, route=Route.COMPLETIONS),
                      "OpenAI completions", body_schema="CompletionRequest"),
            RouteSpec("POST", Route.CHAT.value, partial(dispatcher.handle, route=Route.CHAT),
                      "OpenAI chat completions", body_schema="ChatCompletionRequest"),
            RouteSpec("GET", "/health", info.health,
                      "200 when at least one prefill and one decode worker can take traffic", Access.OPEN),
            RouteSpec("GET", "/health_generate", info.health_generate,
                      "Every available worker's own /health_generate"),
            *(RouteSpec("GET", path, info.from_one_worker, "Model information from one available worker")
              for path in ("/v1/models", "/model_info", "/get_model_info")),
            RouteSpec("GET", MODEL_CARD, info.from_one_worker, "One model's card, from one available worker",
                      path_params=("model",)),
            RouteSpec("POST", "/concate_and_append_request", info.concate_and_append,
                      "Join forked states of an SGLang frontend program, on every worker",
                      body_schema="ConcateAndAppendRequest"),
            *(RouteSpec("GET", path, info.server_info, "Each worker's server info, with the router's settings")
              for path in ("/server_info", "/get_server_info")),
            *(RouteSpec(method, "/flush_cache", info.flush_cache, "Flush every worker's prefix cache")
              for method in ("GET", "POST")),
            RouteSpec("GET", "/metrics", info.metrics, "Prometheus metrics"),
            RouteSpec("GET", "/list_workers", admin.list_workers, "Workers with health, circuit state and load"),
            RouteSpec("POST", "/add_worker", admin.add_worker,
                      "Add a worker once it passes a health check (parameters in the query or a JSON body)",
                      Access.ADMIN, body_schema="AddWorkerRequest", query=("url", "worker_type", "bootstrap_port")),
            RouteSpec("POST", "/remove_worker", admin.remove_worker,
                      "Stop routing to a worker; requests on it finish", Access.ADMIN,
                      body_schema="RemoveWorkerRequest", query=("url",)),
            RouteSpec("GET", "/openapi.json", self._openapi_json, "This document", Access.OPEN),
        ]
        return routes

    async def _openapi_json(self, request: Request, out: ResponseWriter) -> Response:
        return Response(200, self._openapi)

    def _route(self, request: Request) -> RouteSpec | None:
        spec = self._table.get((request.method, request.path))
        if spec is not None:
            return spec
        for method, prefix, template in self._templates:
            if request.method == method and request.path.startswith(prefix) and len(request.path) > len(prefix):
                return template
        return None

    async def handle(self, request: Request, out: ResponseWriter) -> Response | None:
        spec = self._route(request)
        if spec is None:
            return self._unrouted(request)
        refusal = self._refusal(request, spec)
        if refusal is not None:
            return refusal
        try:
            return await spec.handler(request, out)
        except RouterError as e:
            self.router.metrics.error(e.kind)
            return error_response(e.status, e.message, e.error_type)

    def _refusal(self, request: Request, spec: RouteSpec) -> Response | None:
        if spec.access is Access.OPEN:
            return None
        if self._expected is not None:
            given = request.headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                self.router.metrics.error("unauthorized")
                return error_response(401, "missing or invalid API key (send 'Authorization: Bearer <key>')")
            return None
        if spec.access is Access.ADMIN and not self.config.admin_open:
            self.router.metrics.error("forbidden")
            return error_response(403, f"{spec.path} is disabled: this router listens beyond loopback without an "
                                       "API key; start it with --api-key-file (or $TPLA_API_KEY), or with "
                                       "--enable-admin to serve admin routes to anyone who can reach it")
        return None

    def _unrouted(self, request: Request) -> Response:
        methods = self._methods.get(request.path)
        if methods is None:
            self.router.metrics.error("not_found")
            return error_response(404, f"no route {request.path}")
        self.router.metrics.error("method_not_allowed")
        allow = ", ".join(methods)
        return Response(405, error_body(405, f"{request.path} takes {allow}"), headers=((b"Allow", allow.encode()),))


async def serve(config: RouterConfig) -> None:
    """Serve until SIGINT/SIGTERM, then let requests in progress finish for a few seconds."""
    loop = asyncio.get_running_loop()
    app = RouterApp(config)
    server = HttpServer(app.handle, ServerLimits(max_body_bytes=config.max_payload_size), error_response)
    await app.router.start()
    try:
        try:
            await server.start(config.host, config.port)
        except OSError as e:
            raise SystemExit(f"tpla_router: cannot listen on {config.host}:{config.port}: {e}") from None
        logger.info("listening on http://%s:%d", config.host, config.port)
        if config.api_key is None and not config.loopback_only:
            logger.warning("no API key and listening on %s: generation and info routes are open to anyone who "
                           "can reach it; admin routes are %s", config.host,
                           "OPEN (--enable-admin)" if config.enable_admin else "off")
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        logger.info("stopping")
        await server.stop(_SHUTDOWN_GRACE_SECS)
    finally:
        await app.router.stop()


def _event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(config: RouterConfig) -> None:
    """Serve until SIGINT/SIGTERM (uvloop when installed)."""
    logger.info("tpla_router: %s", config.redacted())
    loop = _event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(serve(config))
    finally:
        loop.close()
