"""The server's one error shape, OpenAI's `{"error": {"message", "type", "param", "code"}}`.

`type` is OpenAI's class of error (invalid_request_error, authentication_error, ...) unless a more
specific one is known (kv_transfer_failed, which the router retries on); `param` names the offending
field where one does; `code` is OpenAI's string code where one applies (model_not_found), else the HTTP
status, as SGLang's native API answers it.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

MODEL_NOT_FOUND = "model_not_found"


class APIError(Exception):
    """A request the front answers itself with `status` (4xx: the client's fault, 5xx: ours)."""

    def __init__(
        self, status: int, message: str, err_type: str | None = None, param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param
        self.code = code


def error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    return "invalid_request_error" if status < 500 else "server_error"


def error_body(
    status: int, message: str, err_type: str | None = None, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type or error_type(status), "param": param,
                      "code": code if code is not None else status}}


def api_error_body(e: APIError) -> dict[str, Any]:
    return error_body(e.status, e.message, e.err_type, e.param, e.code)


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None, err_type: str | None = None,
    param: str | None = None, code: str | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, err_type, param, code), status_code=status, headers=headers)


def validation_param(errors: list[dict[str, Any]]) -> str | None:
    """The first bad field of a pydantic error list, as `param` names it (None for a body-level error)."""
    for err in errors:
        path = _render_location(err.get("loc", ()))
        if path:
            return path
    return None


def format_validation_errors(errors: list[dict[str, Any]]) -> str:
    """One line naming each bad field, e.g. `bootstrap_room: Input should be a valid integer`.

    Pydantic reports one error per branch of a union (`text` as `str` and as `list[str]`), with the
    branch's type in the location; those tags are dropped and the branches' messages joined.
    """
    by_field: dict[str, list[str]] = {}
    for err in errors:
        if err.get("type") == "json_invalid":
            reason = (err.get("ctx") or {}).get("error", err.get("msg", ""))
            return f"malformed JSON in the request body: {reason}"
        path = _render_location(err.get("loc", ()))
        if not path:
            if err.get("type") == "missing":
                return "the request needs a JSON body"
            return f"the request body must be a JSON object: {err.get('msg', '')}"
        messages = by_field.setdefault(path, [])
        if err.get("msg") and err["msg"] not in messages:
            messages.append(err["msg"])
    parts = [f"{path}: {' or '.join(msgs)}" for path, msgs in list(by_field.items())[:3]]
    return "; ".join(parts) or "invalid request"


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def _render_location(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path"):
        parts = parts[1:]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif isinstance(p, str) and p.isidentifier() and p not in _TYPE_TAGS:
            out += f".{p}" if out else p
    return out
