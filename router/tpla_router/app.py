"""The router's aiohttp application: routes, authentication, size limits and the error shape."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from functools import partial

from aiohttp import web

from .admin import AdminHandlers
from .config import RouterConfig
from .errors import RouterError, error_response
from .info import InfoHandlers
from .pd_dispatch import PDDispatcher
from .protocol import Route
from .router import Router

logger = logging.getLogger(__name__)

ROUTER_KEY = web.AppKey("router", Router)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_OPEN_PATHS = frozenset({"/health"})


def _errors_middleware(router: Router) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.content_length is not None and request.content_length > router.config.max_payload_size:
            router.metrics.error("payload_too_large")
            return error_response(413, f"request body of {request.content_length} bytes exceeds the "
                                       f"limit of {router.config.max_payload_size} bytes")
        try:
            return await handler(request)
        except RouterError as e:
            router.metrics.error(e.kind)
            return error_response(e.status, e.message)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            if e.status == 413:
                router.metrics.error("payload_too_large")
            return error_response(e.status, e.text or e.reason)

    return errors


def _auth_middleware(router: Router, api_key: str) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in _OPEN_PATHS:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                router.metrics.error("unauthorized")
                return error_response(401, "missing or invalid API key (send 'Authorization: Bearer <key>')")
        return await handler(request)

    return auth


def build_app(config: RouterConfig) -> web.Application:
    router = Router(config)
    middlewares = [_errors_middleware(router)]
    if config.api_key is not None:
        middlewares.append(_auth_middleware(router, config.api_key))
    app = web.Application(client_max_size=config.max_payload_size, middlewares=middlewares)
    app[ROUTER_KEY] = router

    async def start(_: web.Application) -> None:
        await router.start()

    async def stop(_: web.Application) -> None:
        await router.stop()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    dispatcher = PDDispatcher(router)
    for route in Route:
        app.router.add_post(route.value, partial(dispatcher.handle, route=route))
    InfoHandlers(router).add_routes(app)
    AdminHandlers(router).add_routes(app)
    return app


def _event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(config: RouterConfig) -> None:
    """Serve until SIGINT/SIGTERM. A client disconnect cancels its handler, which aborts the request."""
    if config.api_key is None:
        logger.warning("no --api-key: every endpoint, including the admin ones, is open")
    web.run_app(
        build_app(config),
        host=config.host,
        port=config.port,
        handler_cancellation=True,
        access_log=None,
        print=lambda msg: logger.info("%s", msg),
        loop=_event_loop(),
    )
