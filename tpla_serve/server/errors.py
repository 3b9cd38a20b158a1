"""The server's one error shape, `{"error": {"message", "code"}}`, as SGLang and OpenAI servers answer."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse


class APIError(Exception):
    """A request the front answers itself with `status` (4xx: the client's fault, 5xx: ours)."""

    def __init__(self, status: int, message: str, err_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type


def error_body(status: int, message: str, err_type: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"message": message, "code": status}
    if err_type is not None:
        error["type"] = err_type
    return {"error": error}


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None, err_type: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, err_type), status_code=status, headers=headers)


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
