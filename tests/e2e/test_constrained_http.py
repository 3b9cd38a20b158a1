"""Constrained decoding across the PD cluster (`--role all`): the prefill's first token obeys the grammar and
the decode continues the matcher from it. SGLang frontend programs (sgl.gen(regex=...), dtype=int), the
native API's regex / json_schema / ebnf and OpenAI's response_format, through our router.

The bundled model writes Python, so its outputs are checked for validity under their grammar, not content.
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
import sglang as sgl
from sglang.lang.ir import REGEX_FLOAT, REGEX_INT, REGEX_STR
from sglang.test import test_programs

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


@pytest.fixture(scope="module")
def backend(cluster):
    endpoint = sgl.RuntimeEndpoint(cluster.url)
    sgl.set_default_backend(endpoint)
    yield endpoint
    sgl.set_default_backend(None)


def _generate(cluster, prompt: str, params: dict) -> dict:
    r = httpx.post(
        cluster.url + "/generate",
        timeout=120,
        json={"text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 48, **params}},
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_native_constraints_through_the_pd_router(cluster):
    regex = r"[0-9]{3}-[a-z]{2,5}"
    out = _generate(cluster, "def fibonacci(n):", {"regex": regex})
    assert re.fullmatch(regex, out["text"]) and out["meta_info"]["finish_reason"]["type"] == "stop"
    out = _generate(cluster, "def fibonacci(n):", {"json_schema": json.dumps(SCHEMA)})
    jsonschema.validate(json.loads(out["text"]), SCHEMA)
    out = _generate(cluster, "def ", {"ebnf": 'root ::= [a-z_]+ "(" [a-z_]* "):"'})
    assert re.fullmatch(r"[a-z_]+\([a-z_]*\):", out["text"]), out["text"]
    # The first token alone (the prefill's) obeys the grammar too.
    out = _generate(cluster, "x = ", {"regex": "[0-9]{2}", "max_new_tokens": 1})
    assert out["output_ids"] and re.fullmatch("[0-9]{1,2}", out["text"]), out


def test_invalid_grammars_are_400s_naming_the_problem(cluster):
    for params, message in [
        ({"regex": "(abc"}, "regex: Regex parsing error"),
        ({"json_schema": '{"type": 5}'}, "json_schema: "),
        ({"ebnf": "root ::= nope"}, 'ebnf: EBNF parser error at line 1, column 10: Rule "nope"'),
    ]:
        r = httpx.post(cluster.url + "/generate", json={"text": "x", "sampling_params": params}, timeout=120)
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("name", ["test_regex", "test_dtype_gen", "test_decode_json_regex"])
def test_sglang_test_programs(backend, name):
    """SGLang's own programs (sglang/test/test_programs.py) against the cluster, unchanged."""
    getattr(test_programs, name)()


@sgl.function
def decode_int(s):
    """test_programs.test_decode_int's program: it asserts 24 and 365, which this model does not know."""
    s += "The number of hours in a day is " + sgl.gen_int("hours") + "\n"
    s += "The number of days in a year is " + sgl.gen_int("days") + "\n"


@sgl.function
def decode_json(s):
    """test_programs.test_decode_json's program; its REGEX_STR admits raw newlines, which JSON strings may not
    hold, and this model writes them, so the fields are checked against their regexes instead."""
    s += "Generate a JSON object to describe the basic city information of Paris.\n"
    with s.var_scope("json_output"):
        s += "{\n"
        s += '  "name": ' + sgl.gen_string("name") + ",\n"
        s += '  "population": ' + sgl.gen_int("population") + ",\n"
        s += '  "area": ' + sgl.gen("area", dtype=int) + ",\n"
        s += '  "latitude": ' + sgl.gen("latitude", dtype=float) + "\n"
        s += "}"


def test_sglang_dtype_programs_give_values_of_their_type(backend):
    state = decode_int.run(temperature=0.1)
    assert isinstance(int(state["hours"]), int) and isinstance(int(state["days"]), int)
    state = decode_json.run(max_new_tokens=64, temperature=0)
    assert re.fullmatch(REGEX_STR, state["name"]), state["name"]
    for field, regex in [("population", REGEX_INT), ("area", REGEX_INT), ("latitude", REGEX_FLOAT)]:
        assert re.fullmatch(regex, state[field]), (field, state[field])  # the stop strings cut the blanks


def test_openai_response_format(cluster):
    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    numbers = {"type": "array", "items": {"type": "integer"}, "maxItems": 3}
    chat = client.chat.completions.create(
        model="mla-tiny",
        max_tokens=32,
        temperature=0,
        messages=[{"role": "user", "content": "Give numbers."}],
        response_format={"type": "json_schema", "json_schema": {"name": "numbers", "schema": numbers}},
    )
    jsonschema.validate(json.loads(chat.choices[0].message.content), numbers)
    assert chat.choices[0].finish_reason == "stop"
    completion = client.completions.create(
        model="mla-tiny",
        prompt="def fibonacci(n):",
        max_tokens=48,
        temperature=0,
        extra_body={
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}
        },
    )
    jsonschema.validate(json.loads(completion.choices[0].text), SCHEMA)
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(
            model="mla-tiny",
            messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x"}},
        )
