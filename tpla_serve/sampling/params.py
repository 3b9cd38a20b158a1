"""Per-request sampling parameters with SGLang's names, defaults and validity ranges.

`SamplingParams.from_dict` is the single entry point for untrusted input (an HTTP body's
`sampling_params`, an offline `generate` call); every rejection is a ValueError whose message starts
with the offending field's name, so servers can return it as a 400 body unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

# Below this temperature a request is greedy (SGLang's _SAMPLING_EPS).
GREEDY_TEMPERATURE_EPS = 1e-6
# Upper bound for max_new_tokens before any model is known: anything larger is a client bug.
MAX_NEW_TOKENS_LIMIT = (1 << 31) - 1

# SGLang fields this engine does not implement. A request may carry them with their "off" value
# (SGLang's own frontend sends `"stop_regex": null`, the OpenAI adapter sends `"logit_bias": null`);
# any other value is refused instead of silently ignored.
_UNSUPPORTED_FIELDS: dict[str, str] = {
    "structural_tag": "structural tags",
    "stop_regex": "regex stop conditions",
    "logit_bias": "logit bias",
    "custom_params": "custom logit processors",
    "stream_interval": "per-request stream intervals",
}


# The constrained-decoding fields (SGLang's): at most one per request, its grammar source as text.
GRAMMAR_FIELDS = ("regex", "json_schema", "ebnf")

_FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
)


def _is_off(value: Any) -> bool:
    return value is None or (isinstance(value, (list, dict, str)) and len(value) == 0)


def _as_int(name: str, value: Any, *, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value}")
    return value


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _as_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a boolean, got {value!r}")
    return value


def _as_stop(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"stop must be a string or a list of strings, got {value!r}")
    for s in items:
        if not isinstance(s, str):
            raise ValueError(f"stop must contain only strings, got {s!r}")
        if not s:
            raise ValueError("stop must not contain empty strings")
    return tuple(dict.fromkeys(items))


def _as_token_ids(name: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise ValueError(f"{name} must be a list of token ids, got {value!r}")
    ids = [_as_int(name, t, lo=0) for t in value]
    return tuple(sorted(set(ids)))


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling parameters; SGLang's `sampling_params` schema, normalized.

    `stop` is always a tuple of strings, `stop_token_ids` a sorted tuple. `max_new_tokens` may be
    None (SGLang: "up to the context length") until `validate_against` resolves it.
    """

    max_new_tokens: int | None = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: int | None = None
    n: int = 1
    regex: str | None = None
    json_schema: str | None = None  # a JSON schema as JSON text, or "$$ANY$$" for any JSON value
    ebnf: str | None = None

    def __post_init__(self) -> None:
        # Accept the JSON shapes (a bare string, a list) and store the canonical tuples.
        object.__setattr__(self, "stop", _as_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", _as_token_ids("stop_token_ids", self.stop_token_ids))
        for name in _FLOAT_FIELDS:
            object.__setattr__(self, name, _as_float(name, getattr(self, name)))
        self._check()

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SamplingParams:
        """Build from an untrusted mapping. A null value means "use the default", as in SGLang."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ValueError(f"sampling_params must be an object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for name, value in d.items():
            if name in _UNSUPPORTED_FIELDS:
                if not _is_off(value):
                    raise ValueError(
                        f"{name} is not supported: this server has no {_UNSUPPORTED_FIELDS[name]}"
                    )
                continue
            if name not in known:
                raise ValueError(f"{name} is not a known sampling parameter")
            if value is None and name not in ("max_new_tokens", "sampling_seed"):
                continue
            kwargs[name] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON/msgpack-ready form; `from_dict(p.to_dict()) == p`."""
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop)
        d["stop_token_ids"] = list(self.stop_token_ids)
        return d

    # ---- validation ---------------------------------------------------------------------------

    def _check(self) -> None:
        if self.max_new_tokens is not None:
            _as_int("max_new_tokens", self.max_new_tokens, lo=0, hi=MAX_NEW_TOKENS_LIMIT)
        _as_int("min_new_tokens", self.min_new_tokens, lo=0)
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                f"got {self.min_new_tokens}"
            )
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if _as_int("top_k", self.top_k) < 1 and self.top_k != -1:
            raise ValueError(f"top_k must be -1 (all tokens) or >= 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be in (0, 2] (1 = off), got {self.repetition_penalty}")
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"):
            _as_bool(name, getattr(self, name))
        if self.sampling_seed is not None:
            _as_int("sampling_seed", self.sampling_seed, lo=-(1 << 63), hi=(1 << 64) - 1)
        if _as_int("n", self.n) != 1:
            raise ValueError(f"n: a queued request samples once; the HTTP front and Engine.generate expand n > 1 "
                             f"into n requests (got {self.n})")
        given = [name for name in GRAMMAR_FIELDS if getattr(self, name) is not None]
        for name in given:
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        if len(given) > 1:
            raise ValueError(f"{given[1]}: give one of regex, json_schema and ebnf, not {given[0]} too")

    def validate_against(self, vocab_size: int, max_new_tokens_cap: int | None) -> SamplingParams:
        """Checks that need the model: token ids in range, length within the context.

        `max_new_tokens_cap` is what the context still allows (context length minus prompt length).
        Returns the parameters with `max_new_tokens` resolved to an int (None becomes the cap).
        """
        for t in self.stop_token_ids:
            if t >= vocab_size:
                raise ValueError(f"stop_token_ids must be in [0, {vocab_size - 1}], got {t}")
        if self.max_new_tokens is None:
            if max_new_tokens_cap is None:
                raise ValueError(
                    "max_new_tokens must be set: no context-length limit is known to resolve null"
                )
            if self.min_new_tokens > max_new_tokens_cap:
                raise ValueError(
                    f"min_new_tokens={self.min_new_tokens} exceeds what the context allows "
                    f"({max_new_tokens_cap} tokens)"
                )
            return dataclasses.replace(self, max_new_tokens=max_new_tokens_cap)
        if max_new_tokens_cap is not None and self.max_new_tokens > max_new_tokens_cap:
            raise ValueError(
                f"max_new_tokens={self.max_new_tokens} exceeds what the context allows "
                f"({max_new_tokens_cap} tokens)"
            )
        return self

    # ---- derived ------------------------------------------------------------------------------

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def grammar(self) -> tuple[str, str] | None:
        """(field, source) of the request's constraint, or None when its output is unconstrained."""
        for name in GRAMMAR_FIELDS:
            source = getattr(self, name)
            if source is not None:
                return name, source
        return None

    @property
    def has_penalties(self) -> bool:
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0 or self.repetition_penalty != 1.0
