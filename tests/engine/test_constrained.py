"""Constrained decoding through the offline engine on the bundled model (regex, JSON schema, EBNF).

The model writes Python, so what it writes under a grammar is random-ish: the tests check that outputs
obey their grammar (and parse and validate as JSON), not what they say. Overlap scheduling must give
exactly the tokens of the loop without it: a constrained batch reads the step in flight before its next
bitmask, and an unconstrained batch keeps reading one step late.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from tpla_serve import Engine

MODEL = str(Path(__file__).resolve().parents[2] / "models" / "mla-tiny")
ARGS = {"model_path": MODEL, "device": "cpu", "dtype": "float32", "kv_cache_bytes": 1 << 26}
EOS = 1

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "age"],
}
CONFIG = {
    "type": "object",
    "properties": {"debug": {"type": "boolean"}, "level": {"enum": ["low", "high"]}},
    "required": ["debug", "level"],
    "additionalProperties": False,
}
NUMBERS = {"type": "array", "items": {"type": "integer"}, "maxItems": 4}
REGEXES = [r"[0-9]{3}-[a-z]{2,5}", r"(True|False|None)", r"-?(0|[1-9][0-9]{0,5})(\.[0-9]{1,3})?"]
FUNC = 'root ::= name "(" args "):"\nname ::= [a-z_]+\nargs ::= "" | name ("," " "? name)*'

# (prompt, constraint): every grammar here ends within the token budget, so each output is complete.
CASES = [
    ("def fibonacci(n):", {"regex": REGEXES[0]}),
    ("The answer is ", {"regex": REGEXES[1]}),
    ("# numbers\n", {"regex": REGEXES[2]}),
    ("def fibonacci(n):", {"json_schema": json.dumps(PERSON)}),
    ("config = ", {"json_schema": json.dumps(CONFIG)}),
    ("import os\n", {"json_schema": json.dumps(NUMBERS)}),
    ("def ", {"ebnf": FUNC}),
]
FREE = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}


def check(constraint: dict, text: str) -> None:
    """The output is one the constraint allows."""
    if "regex" in constraint:
        assert re.fullmatch(constraint["regex"], text), (constraint, text)
    elif "json_schema" in constraint:
        jsonschema.validate(json.loads(text), json.loads(constraint["json_schema"]))
    else:
        assert re.fullmatch(r"[a-z_]+\((|[a-z_]+(, ?[a-z_]+)*)\):", text), text


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with Engine(**ARGS) as e:
        yield e


def _params(sampled: bool) -> list[dict]:
    out = []
    for i, (_, constraint) in enumerate(CASES):
        p = {**constraint, "max_new_tokens": 64}
        p.update(
            {"temperature": 0.8, "top_p": 0.95, "sampling_seed": 7 + i} if sampled else {"temperature": 0}
        )
        out.append(p)
    return out


def test_greedy_outputs_obey_their_grammar_and_end_with_it(engine):
    outs = engine.generate([p for p, _ in CASES] + ["class A:"], _params(sampled=False) + [FREE])
    for (_, constraint), out in zip(CASES, outs):
        check(constraint, out["text"])
        # The grammar ends the output the way the model ends any: with its stop token.
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOS}
        assert out["output_ids"][-1] == EOS
    # An unconstrained request of the same batch is what it is alone.
    assert outs[-1]["output_ids"] == engine.generate("class A:", FREE)["output_ids"]


def test_sampled_outputs_obey_their_grammar(engine):
    outs = engine.generate([p for p, _ in CASES], _params(sampled=True))
    for (_, constraint), out in zip(CASES, outs):
        if out["meta_info"]["finish_reason"]["type"] == "stop":
            check(constraint, out["text"])


def test_a_grammar_that_ends_finishes_an_ignore_eos_request(engine):
    out = engine.generate(
        "x = ", {"regex": "(yes|no)", "temperature": 0, "ignore_eos": True, "max_new_tokens": 20}
    )
    assert out["text"] in ("yes", "no") and out["meta_info"]["finish_reason"] == {
        "type": "stop",
        "matched": EOS,
    }


def test_logprobs_are_those_of_the_constrained_distribution(engine):
    out = engine.generate(
        "x = ",
        {"regex": "[0-9]{4}", "temperature": 0},
        return_logprob=True,
        top_logprobs_num=5,
        return_text_in_logprobs=True,
    )
    meta = out["meta_info"]
    assert len(meta["output_token_logprobs"]) == len(out["output_ids"])
    for top in meta["output_top_logprobs"][:-1]:  # the last position allows only EOS
        allowed = [t for t in top if t[0] > -1e30]
        assert allowed and all(re.fullmatch("[0-9]+", t[2]) for t in allowed), top


def test_invalid_grammars_are_refused_naming_the_field_and_the_engine_goes_on(engine):
    for params, field in [
        ({"regex": "[0-9"}, "regex"),
        ({"json_schema": "{"}, "json_schema"),
        ({"ebnf": "root ::= x"}, "ebnf"),
    ]:
        with pytest.raises(ValueError, match=f"^{field}: "):
            engine.generate("x", params)
    assert engine.generate("x = ", {"regex": "[0-9]", "temperature": 0})["text"].isdigit()


def test_compiled_grammars_are_reused(engine):
    backend = engine.scheduler.grammar
    engine.generate("a = ", {"regex": REGEXES[1], "temperature": 0})
    hits, misses = backend.hits, backend.misses
    engine.generate(["a = ", "b = "], [{"regex": REGEXES[1], "temperature": 0}] * 2)
    assert (backend.hits, backend.misses) == (hits + 2, misses)


def test_grammar_backend_none_refuses_constraints():
    with Engine(**ARGS, grammar_backend="none") as e:
        with pytest.raises(ValueError, match="^json_schema: constrained decoding is off"):
            e.generate("x", {"json_schema": "{}"})
        assert e.generate("x", {"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_overlap_gives_the_tokens_of_the_plain_loop(engine, sampled, monkeypatch):
    """Constrained and unconstrained requests of different lengths in one batch, finishing at different
    steps; the overlapped loop reads a constrained batch's pending step inside its decode step only."""
    prompts = [p for p, _ in CASES] + ["class A:", "for i in"]
    free = [{**FREE, "max_new_tokens": n} for n in (9, 30)]
    if sampled:
        free = [{**f, "temperature": 0.9, "sampling_seed": 3} for f in free]
    params = _params(sampled) + free
    sched = engine.scheduler
    assert sched.overlap
    early_reads = _count_early_reads(sched, monkeypatch)
    overlapped = engine.generate(prompts, params)
    assert early_reads["constrained"] > 0
    engine.generate(["class A:", "for i in"], free)  # unconstrained: nothing read before its time
    assert early_reads["unconstrained"] == 0
    with Engine(**ARGS, disable_overlap_schedule=True) as plain:
        assert not plain.scheduler.overlap
        expected = plain.generate(prompts, params)
    assert [o["output_ids"] for o in overlapped] == [o["output_ids"] for o in expected]


def _count_early_reads(sched, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts, per kind of batch, the pending steps a decode step reads between its forward and sampling."""
    counts = {"constrained": 0, "unconstrained": 0}
    launcher = sched.launcher
    decode = launcher.decode

    def counting(batch, read_pending=None):
        kind = "constrained" if any(r.grammar is not None for r in batch) else "unconstrained"

        def read() -> None:
            counts[kind] += sched.pending is not None
            read_pending()

        return decode(batch, read_pending=read if read_pending is not None else None)

    monkeypatch.setattr(launcher, "decode", counting)
    return counts
