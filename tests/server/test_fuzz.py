"""A bounded fuzz pass over the server's own OpenAPI document (schemathesis + hypothesis).

For every operation the server publishes, schemathesis generates bodies, queries and headers that follow
the schema (positive) and that break it (negative). Whatever arrives, the server answers with a status
below 500, and afterwards it still serves and every KV page is back in the pool. Generation lengths are
capped before sending so a few hundred cases stay within seconds of model time.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from server_procs import ServerProcess

EXAMPLES_PER_OPERATION = 25
MAX_TOKENS = 4


def _cap_lengths(body: Any) -> Any:
    """Keep any generation short: the pass is about parsing and validation, not about long outputs. A chat
    body without a length would run to the context's end, so it gets one."""
    if isinstance(body, dict):
        for key in ("max_new_tokens", "max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and body[key] > MAX_TOKENS:
                body[key] = MAX_TOKENS
        if "messages" in body and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = MAX_TOKENS
        params = body.get("sampling_params")
        for p in params if isinstance(params, list) else [params]:
            _cap_lengths(p)
    return body


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
def test_no_input_makes_a_server_error(server: ServerProcess, mode: GenerationMode) -> None:
    spec = httpx.get(server.url + "/openapi.json", headers=server.headers, timeout=30).json()
    schema = schemathesis.openapi.from_dict(spec)
    baseline = server.stats()["pages_free"]
    failures: list[str] = []
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def call(case: schemathesis.Case) -> None:
            nonlocal calls
            case.body = _cap_lengths(case.body)
            response = case.call(base_url=server.url, headers=server.headers, timeout=60)
            calls += 1
            if response.status_code >= 500:
                failures.append(f"{operation.label}: {response.status_code} {response.text[:200]}")

        try:
            call()
        except Unsatisfiable:  # negative mode: an operation without inputs has nothing to break
            assert mode is GenerationMode.NEGATIVE, operation.label
    assert calls > 50
    assert not failures, "\n".join(failures[:10])
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert server.wait_idle(baseline)["pages_free"] == baseline
