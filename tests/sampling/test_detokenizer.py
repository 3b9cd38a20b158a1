"""Incremental detokenization and stop handling against tokenizer.decode of a real byte-level BPE."""

from __future__ import annotations

import itertools
import random

import pytest

from tpla_serve.engine.detokenizer import IncrementalDetokenizer, StopChecker, stop_holdback, trim_stop_text
from tpla_serve.sampling import SamplingParams

TEXT = "Grüße aus München 🙂🚀 日本語のテキスト。 The end.\n\nNext: 中文 ∑∫√∞ done."


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_ids_stream_to_exactly_decode(bpe_tokenizer, skip_special_tokens):
    """Random ids (split characters, invalid bytes, special tokens): the streamed text only grows,
    and at every step it is a prefix of decode(ids so far); the final text equals decode(all)."""
    tok = bpe_tokenizer
    rng = random.Random(0)
    for _ in range(60):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 80))]
        d = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
        streamed = ""
        for i, t in enumerate(ids):
            streamed += d.append([t])
            assert streamed == d.text
            assert tok.decode(ids[: i + 1], skip_special_tokens=skip_special_tokens).startswith(streamed)
        assert d.final_text() == tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_split_utf8_never_shows_replacement_character(bpe_tokenizer):
    ids = bpe_tokenizer.encode(TEXT)
    assert any("\ufffd" in bpe_tokenizer.decode([t]) for t in ids), (
        "the text must split characters across tokens"
    )
    d = IncrementalDetokenizer(bpe_tokenizer)
    for t in ids:
        d.append([t])
        assert "\ufffd" not in d.text
    assert d.text == d.final_text() == bpe_tokenizer.decode(ids) == TEXT


def test_chunks_of_several_tokens(bpe_tokenizer):
    ids = bpe_tokenizer.encode(TEXT)
    d = IncrementalDetokenizer(bpe_tokenizer)
    out = "".join(d.append(ids[i : i + 3]) for i in range(0, len(ids), 3))
    assert out == TEXT


def _run(tok, params, ids, eos=()):
    checker = StopChecker(params, IncrementalDetokenizer.for_request(tok, params), eos_token_ids=eos)
    streams = []
    for t in ids:
        if checker.finished:
            break
        checker.append([t])
        streams.append(checker.stream_text())
    return checker, streams


def _assert_stream_is_consistent(streams, final):
    for a, b in itertools.pairwise(streams):
        assert b.startswith(a), (a, b)
    assert final.startswith(streams[-1]) and streams[-1] == final


@pytest.mark.parametrize("stop", ["München", "\n\n", "日本", "🚀", "end."])
def test_stop_string_is_trimmed_and_never_streamed(bpe_tokenizer, stop):
    ids = bpe_tokenizer.encode(TEXT)
    checker, streams = _run(bpe_tokenizer, SamplingParams(stop=[stop], max_new_tokens=500), ids)
    cut = TEXT.index(stop)
    assert checker.finish_reason == {"type": "stop", "matched": stop}
    assert checker.text == TEXT[:cut]
    assert all(stop not in s for s in streams)
    _assert_stream_is_consistent(streams, checker.text)
    # The request ends on the token that completed the stop string.
    assert bpe_tokenizer.decode(checker.output_ids).find(stop) >= 0
    assert bpe_tokenizer.decode(checker.output_ids[:-1]).find(stop) < 0


def test_no_stop_trim_keeps_the_stop_string_and_cuts_after_it(bpe_tokenizer):
    ids = bpe_tokenizer.encode(TEXT)
    checker, streams = _run(
        bpe_tokenizer, SamplingParams(stop=["aus M"], no_stop_trim=True, max_new_tokens=500), ids
    )
    assert checker.finish_reason == {"type": "stop", "matched": "aus M"}
    assert checker.text == TEXT[: TEXT.index("aus M") + len("aus M")]
    _assert_stream_is_consistent(streams, checker.text)


def test_earliest_of_several_stop_strings_wins(bpe_tokenizer):
    ids = bpe_tokenizer.encode("xyz abc")
    checker, _ = _run(bpe_tokenizer, SamplingParams(stop=["abc", "z a"], max_new_tokens=50), ids)
    assert checker.finish_reason == {"type": "stop", "matched": "z a"} and checker.text == "xy"


class Chars:
    """One character per id: makes the streaming positions exact."""

    def decode(self, ids, **kwargs):
        return "".join(chr(i) for i in ids)


def test_holdback_of_a_possible_stop_prefix():
    assert stop_holdback("hello wor", ["world", "xyz"]) == 3
    assert stop_holdback("hello", ["lo!", "llo?"]) == 3
    assert stop_holdback("abc", ["abc"]) == 0  # a full match is a stop, not a prefix
    params = SamplingParams(stop=["STOP", "\n\n"], max_new_tokens=100)
    checker = StopChecker(params, IncrementalDetokenizer(Chars()))
    expected = {
        "one S": "one ",
        "one ST": "one ",
        "one ST ": "one ST ",
        "one ST STO": "one ST ",
        "one ST STOR": "one ST STOR",
        "one ST STOR\n": "one ST STOR",
    }
    seen = []
    for i, ch in enumerate("one ST STOR\nX STOP tail"):
        checker.append([ord(ch)])
        text = "one ST STOR\nX STOP tail"[: i + 1]
        if text in expected:
            assert checker.stream_text() == expected[text], text
        seen.append(checker.stream_text())
    assert checker.finish_reason == {"type": "stop", "matched": "STOP"}
    assert checker.text == "one ST STOR\nX "
    _assert_stream_is_consistent(seen, checker.text)
    relaxed = StopChecker(SamplingParams(stop=["STOP"], no_stop_trim=True), IncrementalDetokenizer(Chars()))
    relaxed.append([ord(c) for c in "a ST"])
    assert relaxed.stream_text() == "a ST"  # the stop string stays in the output anyway


def test_eos_and_stop_token_ids(bpe_tokenizer):
    tok = bpe_tokenizer
    eos = tok.eos_token_id
    body = tok.encode("Hello there")
    # EOS ends the request; its text is not part of the output, but the id is in output_ids.
    checker, _ = _run(tok, SamplingParams(skip_special_tokens=False), body + [eos] + body, eos=[eos])
    assert checker.finish_reason == {"type": "stop", "matched": eos}
    assert checker.output_ids == body + [eos] and checker.text == "Hello there"
    # no_stop_trim keeps the token's text.
    checker, _ = _run(
        tok, SamplingParams(skip_special_tokens=False, no_stop_trim=True), body + [eos], eos=[eos]
    )
    assert checker.text == "Hello there<|eos|>"
    # A request stop token that is ordinary text is cut from the text too.
    there = body[-1]
    checker, _ = _run(tok, SamplingParams(stop_token_ids=[there]), body + body)
    assert checker.finish_reason == {"type": "stop", "matched": there}
    assert checker.text == tok.decode(body[:-1])
    # ignore_eos ignores EOS and stop_token_ids alike (SGLang), until max_new_tokens.
    checker, _ = _run(
        tok,
        SamplingParams(ignore_eos=True, stop_token_ids=[there], max_new_tokens=len(body) + 1),
        body + [eos] + body,
        eos=[eos],
    )
    assert checker.finish_reason == {"type": "length", "length": len(body) + 1}
    assert checker.text == "Hello there"


def test_length_is_checked_before_stops(bpe_tokenizer):
    tok = bpe_tokenizer
    ids = tok.encode("abc")
    checker, _ = _run(
        tok, SamplingParams(max_new_tokens=len(ids) + 1), ids + [tok.eos_token_id], eos=[tok.eos_token_id]
    )
    assert checker.finish_reason == {"type": "length", "length": len(ids) + 1}
    assert StopChecker(SamplingParams(max_new_tokens=0), IncrementalDetokenizer(tok)).finish_reason == {
        "type": "length",
        "length": 0,
    }


def test_multi_token_append_stops_at_the_finishing_token(bpe_tokenizer):
    tok = bpe_tokenizer
    ids = tok.encode("one two three four")
    eos = tok.eos_token_id
    checker = StopChecker(SamplingParams(), IncrementalDetokenizer(tok), eos_token_ids=[eos])
    assert checker.append(ids[:2]) == 2
    assert checker.append(ids[2:4] + [eos] + ids[4:]) == 3
    assert checker.output_ids == ids[:4] + [eos] and checker.finished
    assert checker.append(ids) == 0
    checker.abort("late")  # a finished request keeps its reason
    assert checker.finish_reason["type"] == "stop"


def test_abort():
    checker = StopChecker(SamplingParams(), IncrementalDetokenizer(Chars()))
    checker.append([ord("a"), ord("b")])
    checker.abort("peer died")
    assert checker.finish_reason == {"type": "abort", "message": "peer died"} and checker.text == "ab"


def test_trim_stop_text_rules():
    assert trim_stop_text("abcSTOPdef", {"type": "stop", "matched": "STOP"}, False) == "abc"
    assert trim_stop_text("abcSTOPdef", {"type": "stop", "matched": "STOP"}, True) == "abcSTOP"
    assert trim_stop_text("abc", {"type": "stop", "matched": 0}, False) == "abc"
    assert trim_stop_text("abc", {"type": "length", "length": 3}, False) == "abc"
    assert trim_stop_text("abc", None, False) == "abc"


def test_unresolved_max_new_tokens_is_refused(bpe_tokenizer):
    with pytest.raises(ValueError, match="max_new_tokens"):
        StopChecker(SamplingParams(max_new_tokens=None), IncrementalDetokenizer(bpe_tokenizer))
