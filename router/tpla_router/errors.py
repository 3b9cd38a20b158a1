"""The router's one error shape, {"error": {"message", "type", "param", "code"}}, as the servers answer.

`type` is OpenAI's class of error unless a more specific one is known (kv_transfer_failed); `code` is the
HTTP status, as SGLang answers it.
"""

from __future__ import annotations

import json

from .http import Response


class RouterError(Exception):
    """A request the router answers itself with `status`; `kind` labels the error metric."""

    def __init__(self, status: int, message: str, kind: str, error_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.error_type = error_type


def _default_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    return "invalid_request_error" if status < 500 else "server_error"


def error_body(status: int, message: str, error_type: str | None = None) -> bytes:
    error = {"message": message, "type": error_type or _default_type(status), "param": None, "code": status}
    # ASCII-escaped: a message quoting client input must never fail to encode.
    return json.dumps({"error": error}).encode()


def error_response(status: int, message: str, error_type: str | None = None) -> Response:
    return Response(status, error_body(status, message, error_type))


def sse_error(status: int, message: str, error_type: str | None = None) -> bytes:
    """The SSE events that end a stream on an error: the error event, then [DONE]."""
    return b"data: " + error_body(status, message, error_type) + b"\n\ndata: [DONE]\n\n"
