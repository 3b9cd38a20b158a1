"""SamplingParams: SGLang's defaults and ranges; every bad input is a ValueError naming its field."""

from __future__ import annotations

import pytest

from tpla_serve.sampling import SamplingParams


def test_defaults_match_sglang():
    p = SamplingParams.from_dict(None)
    assert p == SamplingParams.from_dict({})
    assert (p.max_new_tokens, p.min_new_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (
        128,
        0,
        1.0,
        1.0,
        -1,
        0.0,
    )
    assert (p.frequency_penalty, p.presence_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.ignore_eos, p.skip_special_tokens, p.spaces_between_special_tokens, p.no_stop_trim) == (
        False,
        True,
        True,
        False,
    )
    assert p.stop == () and p.stop_token_ids == () and p.sampling_seed is None and p.n == 1


def test_normalization_and_nulls():
    p = SamplingParams.from_dict(
        {
            "stop": "###",
            "stop_token_ids": [7, 3, 7],
            "temperature": 0,
            "top_k": None,
            "sampling_seed": 11,
            "regex": None,
            "json_schema": None,
            "logit_bias": None,
            "custom_params": None,
            "stop_regex": [],
        }
    )
    assert p.stop == ("###",) and p.stop_token_ids == (3, 7)
    assert p.temperature == 0.0 and isinstance(p.temperature, float) and p.is_greedy
    assert p.top_k == -1 and p.sampling_seed == 11
    assert SamplingParams.from_dict({"stop": ["a", "b", "a"]}).stop == ("a", "b")
    assert SamplingParams.from_dict(p.to_dict()) == p
    assert SamplingParams.from_dict({"max_new_tokens": None}).max_new_tokens is None


BAD = [
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"max_new_tokens": 1 << 40}, "max_new_tokens"),
    ({"max_new_tokens": 3.5}, "max_new_tokens"),
    ({"max_new_tokens": "10"}, "max_new_tokens"),
    ({"max_new_tokens": True}, "max_new_tokens"),
    ({"min_new_tokens": -2}, "min_new_tokens"),
    ({"min_new_tokens": 9, "max_new_tokens": 8}, "min_new_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_p": -0.5}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 2.0}, "top_k"),
    ({"min_p": -0.01}, "min_p"),
    ({"min_p": 1.5}, "min_p"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"presence_penalty": -3}, "presence_penalty"),
    ({"presence_penalty": "x"}, "presence_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": 2.5}, "repetition_penalty"),
    ({"stop": 5}, "stop"),
    ({"stop": ["ok", 3]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [1, "2"]}, "stop_token_ids"),
    ({"stop_token_ids": [1.0]}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": 5}, "stop_token_ids"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
    ({"skip_special_tokens": 1}, "skip_special_tokens"),
    ({"no_stop_trim": None, "spaces_between_special_tokens": "no"}, "spaces_between_special_tokens"),
    ({"sampling_seed": "42"}, "sampling_seed"),
    ({"sampling_seed": 1 << 70}, "sampling_seed"),
    ({"n": 2}, "n"),
    ({"n": 0}, "n"),
    ({"temprature": 0.5}, "temprature"),
    ({"seed": 3}, "seed"),
    ({"regex": 5}, "regex"),
    ({"json_schema": {"type": "object"}}, "json_schema"),
    ({"regex": "a+", "ebnf": "root ::= x"}, "ebnf"),
    ({"regex": "", "json_schema": "{}"}, "json_schema"),
    ({"structural_tag": "{}"}, "structural_tag"),
    ({"stop_regex": ["x+"]}, "stop_regex"),
    ({"logit_bias": {"1": 2.0}}, "logit_bias"),
    ({"custom_params": {"a": 1}}, "custom_params"),
]


@pytest.mark.parametrize("body,field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_input_names_the_field(body, field):
    with pytest.raises(ValueError) as err:
        SamplingParams.from_dict(body)
    assert str(err.value).startswith(field), str(err.value)


def test_unsupported_fields_say_not_supported():
    for name, value in [("structural_tag", "{}"), ("stop_regex", "x+"), ("logit_bias", {"1": 1.0})]:
        with pytest.raises(ValueError, match="not supported"):
            SamplingParams.from_dict({name: value})


def test_grammar_fields():
    """SGLang's constrained-decoding fields: one at most, kept as text (compiled by the server)."""
    assert SamplingParams().grammar is None
    for name in ("regex", "json_schema", "ebnf"):
        p = SamplingParams.from_dict({name: "source", "max_new_tokens": 4})
        assert p.grammar == (name, "source")
        assert SamplingParams.from_dict(p.to_dict()) == p


def test_not_a_mapping():
    with pytest.raises(ValueError, match="sampling_params"):
        SamplingParams.from_dict([("temperature", 1.0)])  # type: ignore[arg-type]


def test_validate_against_model():
    p = SamplingParams.from_dict({"stop_token_ids": [5, 99], "max_new_tokens": 50})
    with pytest.raises(ValueError, match="^stop_token_ids"):
        p.validate_against(vocab_size=99, max_new_tokens_cap=100)
    assert p.validate_against(vocab_size=100, max_new_tokens_cap=100) is p
    with pytest.raises(ValueError, match="^max_new_tokens"):
        p.validate_against(vocab_size=100, max_new_tokens_cap=49)
    unbounded = SamplingParams.from_dict({"max_new_tokens": None, "min_new_tokens": 4})
    assert unbounded.validate_against(100, 30).max_new_tokens == 30
    with pytest.raises(ValueError, match="^min_new_tokens"):
        unbounded.validate_against(100, 3)
    with pytest.raises(ValueError, match="^max_new_tokens"):
        unbounded.validate_against(100, None)


def test_direct_construction_is_validated_too():
    assert SamplingParams(stop="x", stop_token_ids=[2, 1]).stop_token_ids == (1, 2)
    with pytest.raises(ValueError, match="^top_p"):
        SamplingParams(top_p=0.0)
