"""The router's OpenAPI 3.1 document, built from its route table so the two cannot drift apart.

Request-body schemas state what the router itself checks plus the common fields of SGLang's and
OpenAI's request types; every schema allows further fields, because the router passes fields it does
not know through to the workers untouched.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import metadata
from typing import Any

from .routes import Access, RouteSpec

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _one_or_list(item: Schema, min_items: int = 0) -> Schema:
    return {"anyOf": [item, {"type": "array", "items": item, "minItems": min_items}]}


_INT = {"type": "integer"}
_TOKENS = {"type": "integer", "minimum": 0}
_STOP = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}

SCHEMAS: dict[str, Schema] = {
    "SamplingParams": {
        "type": "object",
        "properties": {
            "max_new_tokens": _TOKENS,
            "temperature": {"type": "number", "minimum": 0},
            "top_p": {"type": "number", "minimum": 0, "maximum": 1},
            "top_k": _INT,
            "min_p": {"type": "number", "minimum": 0, "maximum": 1},
            "stop": _STOP,
            "ignore_eos": {"type": "boolean"},
        },
        "additionalProperties": True,
    },
    "GenerateRequest": {
        "type": "object",
        "description": "SGLang's /generate body: `text` or `input_ids`, one prompt or a batch (a list).",
        "properties": {
            "text": _one_or_list({"type": "string"}, min_items=1),
            "input_ids": {"anyOf": [{"type": "array", "items": _TOKENS, "minItems": 1},
                                    {"type": "array", "items": {"type": "array", "items": _TOKENS}, "minItems": 1}]},
            "sampling_params": _one_or_list(_ref("SamplingParams")),
            "stream": {"type": "boolean"},
            "return_logprob": _one_or_list({"type": "boolean"}),
            "logprob_start_len": _one_or_list(_INT),
            "top_logprobs_num": _one_or_list(_TOKENS),
            "return_text_in_logprobs": {"type": "boolean"},
            "rid": _one_or_list({"type": "string"}),
        },
        "additionalProperties": True,
    },
    "CompletionRequest": {
        "type": "object",
        "description": "OpenAI's completions body; a list `prompt` is a batch.",
        "properties": {
            "model": {"type": "string"},
            "prompt": {"anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "minItems": 1},
                {"type": "array", "items": _TOKENS, "minItems": 1},
                {"type": "array", "items": {"type": "array", "items": _TOKENS}, "minItems": 1},
            ]},
            "max_tokens": _TOKENS,
            "temperature": {"type": "number", "minimum": 0},
            "top_p": {"type": "number", "minimum": 0, "maximum": 1},
            "n": {"type": "integer", "minimum": 1},
            "stream": {"type": "boolean"},
            "stop": _STOP,
            "seed": _INT,
        },
        "required": ["prompt"],
        "additionalProperties": True,
    },
    "ChatMessage": {
        "type": "object",
        "properties": {
            "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
            "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}},
                                  {"type": "null"}]},
        },
        "required": ["role"],
        "additionalProperties": True,
    },
    "ChatCompletionRequest": {
        "type": "object",
        "description": "OpenAI's chat completions body.",
        "properties": {
            "model": {"type": "string"},
            "messages": {"type": "array", "items": _ref("ChatMessage")},
            "max_tokens": _TOKENS,
            "max_completion_tokens": _TOKENS,
            "temperature": {"type": "number", "minimum": 0},
            "top_p": {"type": "number", "minimum": 0, "maximum": 1},
            "n": {"type": "integer", "minimum": 1},
            "stream": {"type": "boolean"},
            "stop": _STOP,
            "seed": _INT,
        },
        "required": ["messages"],
        "additionalProperties": True,
    },
    "AddWorkerRequest": {
        "type": "object",
        "properties": {
            "url": {"type": "string", "description": "http(s)://host[:port]"},
            "worker_type": {"type": "string", "enum": ["prefill", "decode"]},
            "bootstrap_port": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 65535}, {"type": "null"},
                                         {"type": "string", "enum": ["none"]}]},
        },
        "required": ["url", "worker_type"],
    },
    "RemoveWorkerRequest": {
        "type": "object",
        "properties": {"url": {"type": "string"}},
        "required": ["url"],
    },
    "ConcateAndAppendRequest": {
        "type": "object",
        "properties": {"src_rids": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                       "dst_rid": {"type": "string"}},
        "required": ["src_rids", "dst_rid"],
    },
    "Error": {
        "type": "object",
        "properties": {
            "error": {
                "type": "object",
                "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                               "param": {"type": ["string", "null"]}, "code": {"type": ["integer", "string"]}},
                "required": ["message", "type", "code"],
            },
        },
        "required": ["error"],
    },
}

_ERROR = {"content": {"application/json": {"schema": _ref("Error")}}}
_ERRORS = {
    "400": {"description": "malformed request", **_ERROR},
    "401": {"description": "missing or invalid API key", **_ERROR},
    "413": {"description": "request body over the router's limit", **_ERROR},
}
_UPSTREAM_ERRORS = {
    "502": {"description": "the workers failed the request and retries ran out", **_ERROR},
    "503": {"description": "no available worker, or KV transfers kept failing (type kv_transfer_failed)", **_ERROR},
    "504": {"description": "the request outlived --request-timeout-secs", **_ERROR},
}


def _version() -> str:
    try:
        return metadata.version("tpla-serve")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def _operation(spec: RouteSpec) -> Schema:
    op_id = spec.path.replace("/", "_").replace("{", "").replace("}", "")
    op: Schema = {"summary": spec.summary, "operationId": f"{spec.method.lower()}{op_id}"}
    if spec.access is not Access.OPEN:
        op["security"] = [{"bearer": []}]
    parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in spec.path_params]
    parameters += [{"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
                   for name in spec.query]
    if parameters:
        op["parameters"] = parameters
    responses: Schema = {"200": {"description": "success"}}
    if spec.body_schema is not None:
        op["requestBody"] = {"required": spec.access is not Access.ADMIN,
                             "content": {"application/json": {"schema": _ref(spec.body_schema)}}}
        responses.update(_ERRORS)
    if spec.body_schema in ("GenerateRequest", "CompletionRequest", "ChatCompletionRequest"):
        responses["200"] = {"description": "the decode worker's answer; text/event-stream when stream is true",
                            "content": {"application/json": {}, "text/event-stream": {}}}
        responses.update(_UPSTREAM_ERRORS)
    if spec.access is Access.ADMIN:
        responses["403"] = {"description": "admin routes are off (no API key, listening beyond loopback)", **_ERROR}
    op["responses"] = responses
    return op


def document(routes: Iterable[RouteSpec]) -> Schema:
    paths: dict[str, Schema] = {}
    for spec in routes:
        paths.setdefault(spec.path, {})[spec.method.lower()] = _operation(spec)
    return {
        "openapi": "3.1.0",
        "info": {"title": "tpla_router", "version": _version(),
                 "description": "PD-aware router for prefill/decode LLM servers (SGLang and OpenAI APIs)."},
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
