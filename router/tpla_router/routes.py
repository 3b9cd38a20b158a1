"""What the router serves: one RouteSpec per (method, path), read by the dispatcher and by /openapi.json."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .http import Request, Response, ResponseWriter

Handler = Callable[[Request, ResponseWriter], Awaitable["Response | None"]]


class Access(enum.Enum):
    OPEN = "open"  # no key needed, ever
    KEY = "key"  # the key, when the router has one
    ADMIN = "admin"  # the key; without a key, only where admin routes are open


@dataclass(frozen=True)
class RouteSpec:
    method: str
    path: str
    handler: Handler
    summary: str
    access: Access = Access.KEY
    body_schema: str | None = None  # name of the request-body schema in the OpenAPI document
    query: tuple[str, ...] = ()  # query parameters it reads
    path_params: tuple[str, ...] = ()  # a parameter in the last path segment, as `/v1/models/{model}`
