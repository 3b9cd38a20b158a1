"""The HTTP front process of a prefill or decode server: FastAPI app, guards, and the uvicorn loop.

The front tokenizes, validates and waits; the scheduler process (spawned here) runs the model. The front
listens at once and answers /health with 503 until the scheduler reports ready.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tpla_serve.config import ServerConfig
from tpla_serve.server import native_api, openai_api, openai_chat, openai_completions
from tpla_serve.server.body_check import lone_surrogate
from tpla_serve.server.chat_template import resolve_chat_template
from tpla_serve.server.errors import APIError, error_response, format_validation_errors, validation_param
from tpla_serve.server.metrics import ServerMetrics
from tpla_serve.server.scheduler_client import SchedulerClient
from tpla_serve.server.state import FrontState
from tpla_serve.server.warmup import warm_up

logger = logging.getLogger(__name__)

_OPEN_PATHS = frozenset({"/health"})


class _BodyTooLarge(Exception):
    pass


class _BadText(Exception):
    pass


class GuardMiddleware:
    """API key, body-size limit and the request counter, in front of every route.

    The body is read here (up to the limit) and replayed to the app, so a chunked upload cannot slip
    past the limit; after the replay, `receive` passes through so handlers still see the disconnect.
    """

    def __init__(self, app: ASGIApp, config: ServerConfig, metrics: ServerMetrics, routes: set[str]) -> None:
        self.app = app
        self.api_key = config.api_key
        self.max_body = config.max_body_bytes
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        status: dict[str, int] = {}

        async def send_recording(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            rejection = self._check_key(scope, path)
            if rejection is None:
                try:
                    receive = await self._buffer_body(scope, receive)
                except _BodyTooLarge:
                    rejection = (413, f"the request body is larger than the limit of {self.max_body} bytes "
                                      "(--max-body-bytes)")
                except _BadText as e:
                    rejection = (400, str(e))
            if rejection is not None:
                code, message = rejection
                headers = {"WWW-Authenticate": "Bearer"} if code == 401 else None
                await error_response(code, message, headers)(scope, receive, send_recording)
                return
            await self.app(scope, receive, send_recording)
        finally:
            route = path if path in self.routes else "other"
            self.metrics.requests.labels(route, str(status.get("code", 499))).inc()

    def _check_key(self, scope: Scope, path: str) -> tuple[int, str] | None:
        if self.api_key is None or path in _OPEN_PATHS:
            return None
        auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        valid = hmac.compare_digest(token.strip().encode(), self.api_key.encode())
        if scheme.lower() != "bearer" or not valid:
            return 401, "missing or invalid API key: send 'Authorization: Bearer <key>'"
        return None

    async def _buffer_body(self, scope: Scope, receive: Receive) -> Receive:
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise _BodyTooLarge
        if scope["method"] in ("GET", "HEAD"):
            return receive
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return _replay([message], receive)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if (problem := lone_surrogate(body)) is not None:
            raise _BadText(problem)
        return _replay([{"type": "http.request", "body": body, "more_body": False}], receive)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Any:
        return error_response(exc.status, exc.message, err_type=exc.err_type, param=exc.param, code=exc.code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Any:
        errors = list(exc.errors())
        return error_response(400, format_validation_errors(errors), param=validation_param(errors))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Any:
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Any:
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")


async def _start_serving(config: ServerConfig, client: SchedulerClient, tokenizer: Any | None) -> None:
    """Once the model is loaded, serve the warm-up request (unless skipped), then report ready."""
    logger.info("%s server on http://%s:%d: loading %s", config.role, config.host, config.port,
                config.engine.model_path)
    await client.ready.wait()
    if not config.skip_server_warmup:
        try:
            await warm_up(client, tokenizer)
        except RuntimeError as e:
            client.fail(str(e))
            return
    client.serving.set()
    logger.info("%s server ready on http://%s:%d (model %s)", config.role, config.host, config.port,
                config.model_name)


def _signal_seen(signum: int, frame: object) -> None:
    """uvicorn re-raises the signal that stopped it once it has shut down; the shutdown is already done."""


def build_app(config: ServerConfig, client: SchedulerClient, tokenizer: Any | None) -> FastAPI:
    """The app of one server; `client` has been started, and is run and closed by the app's lifespan."""
    metrics = ServerMetrics(config, lambda: client.last_stats)
    client.metrics = metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        receiver = asyncio.ensure_future(client.run())
        starter = asyncio.ensure_future(_start_serving(config, client, tokenizer))
        try:
            yield
        finally:
            starter.cancel()
            receiver.cancel()
            client.close()

    app = FastAPI(title=f"tpla-serve {config.role} server", lifespan=lifespan)
    app.state.front = FrontState(config=config, client=client, tokenizer=tokenizer, metrics=metrics)
    routers = (native_api.router, openai_api.router, openai_completions.router, openai_chat.router)
    for api in routers:
        app.include_router(api)
    _install_error_handlers(app)
    routes = {route.path for api in routers for route in api.routes}  # type: ignore[attr-defined]
    app.add_middleware(GuardMiddleware, config=config, metrics=metrics, routes=routes)
    return app


def run_server(config: ServerConfig) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit code (1 if the scheduler failed)."""
    client = SchedulerClient(config)
    client.start()  # the model loads while the front imports and loads its tokenizer
    try:
        tokenizer = None
        if not config.engine.skip_tokenizer_init:
            from tpla_serve.engine.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(config.engine.resolved_tokenizer_path, config.engine.trust_remote_code)
            if config.chat_template is not None:
                tokenizer.chat_template = resolve_chat_template(config.chat_template)
        app = build_app(config, client, tokenizer)
        server = uvicorn.Server(uvicorn.Config(
            app, host=config.host, port=config.port, log_level=config.log_level.lower(),
            timeout_graceful_shutdown=5, access_log=False, log_config=None,
        ))

        def stop(reason: str) -> None:  # the client has logged the reason
            logger.error("shutting down: the scheduler cannot serve")
            server.should_exit = True

        client.on_fatal = stop
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _signal_seen)
        server.run()
        return 1 if client.failure is not None else 0
    finally:
        client.close()

