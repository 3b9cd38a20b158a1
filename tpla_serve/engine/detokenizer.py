"""Incremental detokenization and stop conditions for one request's output stream.

`IncrementalDetokenizer` decodes a window of recent tokens each step instead of the whole output
(SGLang's surr/read offsets): text is committed only when the window's decode does not end in
U+FFFD, so a UTF-8 character split across byte-level tokens is never shown half-done, and the
committed text always equals `tokenizer.decode(ids)` of the ids seen so far, up to that point.

`StopChecker` applies SGLang's finish rules in SGLang's order — length first, then EOS /
stop_token_ids (unless ignore_eos), then stop strings, then the grammar of a constrained request (it
ends once the grammar accepts a stop token) — and SGLang's trimming: a matched stop string
and everything after it are cut from the text (kept, with nothing after it, under no_stop_trim);
a matched stop token is left out of the text unless no_stop_trim. It also tells a streamer how
much of the text is final: a tail that could still grow into a stop string is held back.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from tpla_serve.grammar.matcher import RequestGrammar
from tpla_serve.sampling.params import SamplingParams

_REPLACEMENT = "\ufffd"

FinishReason = dict[str, Any]


class _Tokenizer(Protocol):
    def decode(self, token_ids: list[int], **kwargs: Any) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing list of output ids into text."""

    def __init__(
        self,
        tokenizer: _Tokenizer,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._decode_kwargs = {
            "skip_special_tokens": skip_special_tokens,
            "spaces_between_special_tokens": spaces_between_special_tokens,
        }
        self._ids: list[int] = []
        self._committed = ""  # text of ids[:read]
        self._surr = 0  # start of the decode window; ids[surr:read] is context already committed
        self._read = 0  # first id whose text is not committed
        self._surr_text = ""  # decode(ids[surr:read])
        self._pending = ""  # decode(ids[surr:])[len(surr_text):], not committed (ends in U+FFFD or empty)

    @classmethod
    def for_request(cls, tokenizer: _Tokenizer, params: SamplingParams) -> IncrementalDetokenizer:
        return cls(tokenizer, params.skip_special_tokens, params.spaces_between_special_tokens)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, **self._decode_kwargs) if ids else ""

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)

    def append(self, token_ids: Iterable[int]) -> str:
        """Add tokens; returns the text that became final with them (possibly empty)."""
        before = len(self.text)
        self._ids.extend(int(t) for t in token_ids)
        window = self._decode(self._ids[self._surr :])
        new_text = window[len(self._surr_text) :]
        if new_text and not new_text.endswith(_REPLACEMENT):
            self._committed += new_text
            self._surr, self._read = self._read, len(self._ids)
            self._surr_text = self._decode(self._ids[self._surr : self._read])
            self._pending = ""
        else:
            self._pending = new_text
        return self.text[before:]

    @property
    def text(self) -> str:
        """Text that later tokens cannot change: committed text plus the pending text up to an
        incomplete trailing character."""
        return self._committed + self._pending.rstrip(_REPLACEMENT)

    def final_text(self) -> str:
        """Everything, including a trailing incomplete character as U+FFFD (what decode gives)."""
        return self._committed + self._pending


def trim_stop_text(text: str, finish_reason: FinishReason | None, no_stop_trim: bool) -> str:
    """SGLang's text trimming for a request finished by a stop string."""
    matched = (finish_reason or {}).get("matched")
    if not isinstance(matched, str):
        return text
    pos = text.find(matched)
    if pos < 0:
        return text
    return text[: pos + len(matched)] if no_stop_trim else text[:pos]


def stop_holdback(text: str, stop: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


class StopChecker:
    """One request's output: feeds sampled tokens to its detokenizer and decides when it ends.

    `eos_token_ids` are the model's EOS ids (generation config / tokenizer); the request's own
    stop_token_ids are added. `output_ids` keeps the matched stop token (SGLang reports it in
    output_ids and completion_tokens); only the text leaves it out. `grammar`: a constrained request's
    matcher, which accepts every output token the checker takes, in order.
    """

    def __init__(
        self,
        params: SamplingParams,
        detokenizer: IncrementalDetokenizer,
        eos_token_ids: Iterable[int] = (),
        grammar: RequestGrammar | None = None,
    ) -> None:
        if params.max_new_tokens is None:
            raise ValueError(
                "max_new_tokens must be resolved (SamplingParams.validate_against) before generation"
            )
        self._params = params
        self._detok = detokenizer
        self._stop_ids = frozenset(params.stop_token_ids).union(int(t) for t in eos_token_ids)
        self._max_stop_len = max((len(s) for s in params.stop), default=0)
        self._searched = 0  # text length already searched for stop strings
        self._undecoded: list[int] = []  # tokens for the text, not fed to the detokenizer yet
        self.output_ids: list[int] = []
        self.finish_reason: FinishReason | None = None
        self.grammar = grammar
        if params.max_new_tokens == 0:
            self.finish_reason = {"type": "length", "length": 0}

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token_ids: Sequence[int]) -> int:
        """Feed newly sampled tokens (one per step, or several accepted draft tokens).

        Returns how many were taken: tokens after the one that finished the request are dropped,
        so the caller can roll back their KV. The text is decoded when it is asked for (or, with stop
        strings, at once): the per-token path is counting and set lookups only.
        """
        taken = 0
        params = self._params
        for t in token_ids:
            if self.finish_reason is not None:
                break
            t = int(t)
            taken += 1
            self.output_ids.append(t)
            if len(self.output_ids) >= params.max_new_tokens:
                self._undecoded.append(t)
                self.finish_reason = {"type": "length", "length": params.max_new_tokens}
            elif not params.ignore_eos and t in self._stop_ids:
                if params.no_stop_trim:
                    self._undecoded.append(t)
                self.finish_reason = {"type": "stop", "matched": t}
            else:
                self._undecoded.append(t)
                if params.stop:
                    self._check_stop_strings()
            if self.grammar is not None and self.finish_reason is None:
                self._advance_grammar(self.grammar, t)
        return taken

    def _advance_grammar(self, grammar: RequestGrammar, token: int) -> None:
        """A stop token the grammar accepts ends the request (SGLang reports it as matched). The sampler masks
        every token the grammar refuses, so a refused one comes from a row that allowed none (min_new_tokens
        past the grammar's end) or from a PD prefill that sampled without the grammar: the request aborts."""
        if not grammar.accept(token):
            index = len(self.output_ids) - 1
            self.abort(f"{grammar.field}: output token {index} ({token}) breaks the grammar")
        elif grammar.terminated:
            self.finish_reason = {"type": "stop", "matched": token}

    def _decoded(self) -> IncrementalDetokenizer:
        """The detokenizer, fed every token so far."""
        if self._undecoded:
            self._detok.append(self._undecoded)
            self._undecoded = []
        return self._detok

    def abort(self, message: str, status_code: int | None = None, err_type: str | None = None) -> None:
        """End the request. status_code / err_type (SGLang's abort fields): the HTTP error the request's
        answer becomes, for failures that are the server's, not the client's doing."""
        if not self.finished:
            self.finish_reason = {"type": "abort", "message": message}
            if status_code is not None:
                self.finish_reason["status_code"] = status_code
            if err_type is not None:
                self.finish_reason["err_type"] = err_type

    def _check_stop_strings(self) -> None:
        text = self._decoded().text
        start = max(0, self._searched - self._max_stop_len + 1)
        best: tuple[int, str] | None = None
        for s in self._params.stop:
            pos = text.find(s, start)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, s)
        self._searched = len(text)
        if best is not None:
            self.finish_reason = {"type": "stop", "matched": best[1]}

    @property
    def text(self) -> str:
        """The output text: final and trimmed once finished, else everything decoded so far."""
        if not self.finished:
            return self._decoded().text
        return trim_stop_text(self._decoded().final_text(), self.finish_reason, self._params.no_stop_trim)

    def stream_text(self) -> str:
        """Cumulative text a streamer may send now; every value is a prefix of the next and of
        the final `text`."""
        if self.finished:
            return self.text
        text = self._decoded().text
        if self._params.no_stop_trim:
            return text
        return text[: len(text) - stop_holdback(text, self._params.stop)]
