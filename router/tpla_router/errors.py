"""The router's one error shape, {"error": {"message", "code"}}, as SGLang servers answer."""

from __future__ import annotations

import json

from aiohttp import web


class RouterError(Exception):
    """A request the router answers itself with `status`; `kind` labels the error metric."""

    def __init__(self, status: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


def error_body(status: int, message: str) -> bytes:
    return json.dumps({"error": {"message": message, "code": status}}).encode()


def error_response(status: int, message: str) -> web.Response:
    return web.Response(status=status, body=error_body(status, message), content_type="application/json")
