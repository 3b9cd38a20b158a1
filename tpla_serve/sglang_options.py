"""SGLang launch options for features tpla-serve implements differently, or not at all.

SGLang launch lines must parse here, and an option must never be dropped silently: each one below is
accepted at the value that describes what tpla-serve does, and refused at any other value with a
message that names the flag and what to use instead. Both the command line (tpla_serve.flags) and the
offline Engine's keyword arguments go through `check_sglang_options`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

@dataclass(frozen=True)
class SGLangOption:
    name: str  # SGLang's field name; the flag is --name-with-dashes
    default: Any
    type: type
    help: str
    accepts: Callable[[Any], bool]
    instead: str  # why another value is refused, and what to use

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


SGLANG_OPTIONS: tuple[SGLangOption, ...] = (
    SGLangOption(
        "dp_size", 1, int, "data-parallel replicas of the model (only 1 here)", lambda v: v == 1,
        "data parallelism is not implemented: run one server per replica behind the router (--role router), "
        "which balances between them"),
    SGLangOption(
        "enable_dp_attention", False, bool, "data-parallel attention (not implemented here)", lambda v: not v,
        "DP attention is not implemented: TPLA splits the latent KV cache across the TP ranks instead "
        "(--tp-size with --tpla-groups)"),
    SGLangOption(
        "disaggregation_transfer_backend", "zmq", str,
        "how KV moves from prefill to decode servers: zmq, this project's authenticated transport (the "
        "handshake over ZMQ, the KV over TCP straight into the decode's pages)",
        lambda v: v == "zmq",
        "the KV transport here is tpla-serve's own authenticated transport "
        "(--disaggregation-transfer-backend zmq); mooncake, nixl and the others are not implemented"),
    SGLangOption(
        "speculative_eagle_topk", None, int, "drafts per step of a draft tree (only 1: one chain here)",
        lambda v: v in (None, 1),
        "tree drafting is not implemented: drafts form one chain (--speculative-eagle-topk 1), "
        "--speculative-num-steps of them per verification"),
)
SGLANG_OPTION_NAMES = frozenset(o.name for o in SGLANG_OPTIONS)


def check_sglang_options(values: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first option set to a value tpla-serve cannot serve."""
    for option in SGLANG_OPTIONS:
        value = values.get(option.name, option.default)
        if not option.accepts(value):
            shown = "" if isinstance(value, bool) else f" {value}"
            raise ValueError(f"{option.flag}{shown}: {option.instead}")


def draft_tokens_per_step(num_steps: int | None, num_draft_tokens: int | None, default: int) -> int:
    """k, the drafts proposed per verification, from SGLang's options or ours.

    SGLang names k --speculative-num-steps and counts the verified token in --speculative-num-draft-tokens
    (num_steps + 1 for a chain); here --speculative-num-draft-tokens alone is k, as it always was.
    """
    if num_steps is None:
        return default if num_draft_tokens is None else num_draft_tokens
    if num_steps < 1:
        raise ValueError(f"--speculative-num-steps must be >= 1, got {num_steps}")
    if num_draft_tokens is not None and num_draft_tokens != num_steps + 1:
        raise ValueError(
            f"--speculative-num-steps {num_steps} with --speculative-num-draft-tokens {num_draft_tokens}: "
            f"with SGLang's options a chain of {num_steps} drafts counts {num_steps + 1} draft tokens (the "
            "verified one included); give --speculative-num-steps alone, or set the tokens to steps + 1"
        )
    return num_steps
