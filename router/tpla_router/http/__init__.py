"""The router's own HTTP/1.1 layer: a server for clients and a pooled client for workers.

Both sit directly on asyncio's Protocol API with httptools (llhttp) parsing, because the router's
work per request is small (read a JSON body, splice a few fields in, forward it twice, pass an
answer back) and a general framework's per-request objects cost more CPU than that work itself.
"""

from .client import (
    Body,
    UpstreamBroken,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from .server import HttpServer, Request, Response, ResponseWriter, ServerLimits

__all__ = [
    "Body",
    "HttpServer",
    "Request",
    "Response",
    "ResponseWriter",
    "ServerLimits",
    "UpstreamBroken",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamResponse",
    "UpstreamTimeout",
    "UpstreamUnreachable",
]
