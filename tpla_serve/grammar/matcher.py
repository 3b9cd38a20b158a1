"""A request's grammar matcher, and the bitmask of a batch's constrained rows.

The matcher stays in step with the request's output: every token the request emits is accepted here, in
order (on a PD decode server the prefill's first token too), so the bitmask it fills is always the one
for the token after the request's newest. Speculative drafts advance it tentatively and roll it back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from tpla_serve.sampling.bitmask import TokenBitmask, bitmask_width


class Matcher(Protocol):
    """What a request uses of xgrammar's GrammarMatcher."""

    def accept_token(self, token_id: int) -> bool: ...
    def rollback(self, num_tokens: int) -> None: ...
    def is_terminated(self) -> bool: ...
    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int) -> bool: ...


class RequestGrammar:
    """One request's position in its grammar. `terminated`: the grammar accepted a stop token and the
    output is complete; no token may follow."""

    def __init__(self, matcher: Matcher, field: str) -> None:
        self._matcher = matcher
        self.field = field  # regex | json_schema | ebnf: what error messages name

    @property
    def terminated(self) -> bool:
        return self._matcher.is_terminated()

    def accept(self, token: int) -> bool:
        """Advance past `token`; False (the state unchanged) when the grammar does not allow it here."""
        return self._matcher.accept_token(int(token))

    def rollback(self, num_tokens: int) -> None:
        """Undo the last num_tokens accepted tokens (rejected speculative drafts)."""
        if num_tokens > 0:
            self._matcher.rollback(num_tokens)

    def fill(self, host_bits: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into row `row` of a host int32 bitmask [R, W]."""
        if self.terminated:
            raise RuntimeError("a terminated grammar allows no next token: its request has finished")
        self._matcher.fill_next_token_bitmask(host_bits, row)


def host_bitmask(rows: int, vocab_size: int, device: torch.device) -> torch.Tensor:
    """An int32 [rows, W] host buffer for matchers to fill; pinned when it goes to a GPU."""
    return torch.empty(rows, bitmask_width(vocab_size), dtype=torch.int32, pin_memory=device.type == "cuda")


def grammar_bitmask(
    grammars: Sequence[RequestGrammar | None], vocab_size: int, device: torch.device
) -> TokenBitmask | None:
    """The bitmask of the rows whose grammar goes on (row i samples the request of grammars[i]); None when
    no row is constrained. A terminated grammar's row (its request finished while its token was in flight)
    stays unconstrained: that token is dropped."""
    rows = [i for i, g in enumerate(grammars) if g is not None and not g.terminated]
    if not rows:
        return None
    host = host_bitmask(len(rows), vocab_size, device)
    for j, i in enumerate(rows):
        grammar = grammars[i]
        assert grammar is not None
        grammar.fill(host, j)
    return TokenBitmask.to_device(rows, host, device)
