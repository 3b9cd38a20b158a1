"""The router's /openapi.json, and a bounded fuzz pass over it against a router in front of stub workers.

The fuzz draws request bodies from the document's own schemas (hypothesis-jsonschema), breaks some
of them (truncated, deep, lone surrogates, not an object, random bytes) and calls the other routes
too. No answer may be a 5xx of the router's own making (a 502/503/504 naming the worker that failed
is an upstream one), and every in-flight count must be back to 0 afterwards. The admin routes are
left out: their input is worker URLs, and probing random hosts would leave this machine.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema
from router_procs import RouterProcess, Workers, router_args, wait_for

GENERATION = ("/generate", "/v1/completions", "/v1/chat/completions")
ADMIN = ("/add_worker", "/remove_worker")
FUZZ_CASES = 300


@pytest.fixture(scope="module")
def router(module_workers: Workers) -> Iterator[RouterProcess]:
    r = RouterProcess(router_args(module_workers.prefill, module_workers.decode, "--disable-health-check",
                                  "--log-level", "warning"))
    yield r
    r.stop()


def resolve(schema: Any, components: dict[str, Any]) -> Any:
    """The schema with its local $refs inlined (the document's schemas are not recursive)."""
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if ref is not None:
            return resolve(components[ref.rsplit("/", 1)[1]], components)
        return {k: resolve(v, components) for k, v in schema.items()}
    if isinstance(schema, list):
        return [resolve(v, components) for v in schema]
    return schema


def test_openapi_document_describes_every_route(http: httpx.Client, router: RouterProcess, workers: Workers) -> None:
    r = http.get(router.url + "/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    doc = r.json()
    assert doc["openapi"].startswith("3.") and doc["info"]["title"] == "tpla_router"
    served = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    assert served >= {("POST", p) for p in GENERATION} | {("POST", p) for p in ADMIN} | {
        ("GET", "/health"), ("GET", "/health_generate"), ("GET", "/v1/models"), ("GET", "/model_info"),
        ("GET", "/get_model_info"), ("GET", "/server_info"), ("GET", "/get_server_info"), ("GET", "/flush_cache"),
        ("POST", "/flush_cache"), ("GET", "/metrics"), ("GET", "/list_workers"), ("GET", "/openapi.json")}
    components = doc["components"]["schemas"]
    for path in GENERATION:
        schema = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert resolve(schema, components)["type"] == "object"
    # Every documented route is really served: none answers 404 or 405.
    bodies = {"/generate": {"text": "hi"}, "/v1/completions": {"prompt": "hi"},
              "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}]},
              "/concate_and_append_request": {"src_rids": ["a"], "dst_rid": "b"}}
    for method, path in sorted(served):
        if path in ADMIN:
            continue
        answer = http.request(method, router.url + path.replace("{model}", "stub-model"), json=bodies.get(path))
        assert answer.status_code < 400, (method, path, answer.status_code, answer.text[:200])
    # A worker's 4xx about the request itself is the answer, not a failure to route around.
    r = http.get(router.url + "/v1/models/no-such-model")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


@dataclass(frozen=True)
class Case:
    method: str
    path: str
    body: bytes | None


def _encoded(value: Any) -> bytes:
    return json.dumps(value).encode()


def cases(doc: dict[str, Any]) -> st.SearchStrategy[Case]:
    components = doc["components"]["schemas"]
    bodies = {path: from_schema(resolve(doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]
                                        ["schema"], components)).map(_encoded)
              for path in GENERATION}
    valid = st.sampled_from(GENERATION).flatmap(lambda path: bodies[path].map(lambda b: Case("POST", path, b)))
    broken_body = st.one_of(
        st.binary(max_size=64),
        st.sampled_from(GENERATION).flatmap(lambda path: bodies[path]).map(lambda b: b[: len(b) // 2]),
        st.integers(1, 5000).map(lambda n: b'{"text": "x", "deep": ' + b"[" * n + b"]" * n + b"}"),
        st.sampled_from([b'{"text": "\\ud800"}', b'{"prompt": "\\udc00x"}', b'{"text": "\xed\xa0\x80"}', b"[1, 2]",
                         b'"text"', b"null", b'{"text": "\xff"}', b"{}", b'{"text": []}', b'{"input_ids": []}',
                         b'{"messages": "no"}', b'{"text": "a", "stream": "yes"}', b"", b"{" * 3]),
    )
    broken = st.tuples(st.sampled_from(GENERATION), broken_body).map(lambda pb: Case("POST", pb[0], pb[1]))
    others = st.sampled_from([(method.upper(), path) for path, ops in doc["paths"].items() for method in ops
                              if path not in GENERATION and path not in ADMIN])
    other = st.tuples(others, st.one_of(st.none(), st.binary(max_size=32))).map(
        lambda c: Case(c[0][0], c[0][1], c[1]))
    wrong_method = st.sampled_from(GENERATION).map(lambda path: Case("GET", path, None))
    return st.one_of(valid, valid, broken, other, wrong_method)


def test_fuzz_over_the_openapi_document(http: httpx.Client, router: RouterProcess, workers: Workers) -> None:
    doc = http.get(router.url + "/openapi.json").json()
    for w in workers.all:
        w.configure(record=False)
    seen: list[int] = []

    @settings(max_examples=FUZZ_CASES, derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])
    @given(case=cases(doc))
    def call(case: Case) -> None:
        r = http.request(case.method, router.url + case.path, content=case.body,
                         headers={"Content-Type": "application/json"})
        seen.append(r.status_code)
        if r.status_code >= 500:
            message = r.json()["error"]["message"]
            upstream = "worker http://" in message or message.startswith("no available")
            assert r.status_code in (502, 503, 504) and upstream, (case, r.status_code, message)

    call()
    assert len(seen) >= FUZZ_CASES and any(s == 200 for s in seen) and any(s == 400 for s in seen)
    listing = http.get(router.url + "/list_workers").json()
    wait_for(lambda: all(w["in_flight"] == 0 for ws in http.get(router.url + "/list_workers").json().values()
                         for w in ws), what="every in-flight count back to 0")
    assert sum(len(ws) for ws in listing.values()) == 4
    assert http.get(router.url + "/health").status_code == 200
