"""The grammar bitmasks of one speculative block, for constrained requests.

Row j of request b's block — the draft's distribution that draws d_{j+1} and the target's after
d_1..d_j — is masked by b's grammar after d_1..d_j, so drafts obey the grammar and verification compares
the same constrained distributions plain decoding samples from (greedy blocks emit exactly its tokens).
Drafting advances each matcher through its drafts, filling the next mask as it goes: a draft the grammar
refuses (only a row with no allowed token can draw one) is dropped with everything after it, and a draft
that completes the grammar is the request's last. After verification every matcher is rolled back to
the block's start; the scheduler then advances it through the tokens the block emits, as for any token.
"""

from __future__ import annotations

import torch

from tpla_serve.engine.request import Request
from tpla_serve.grammar.matcher import RequestGrammar, host_bitmask
from tpla_serve.sampling.bitmask import TokenBitmask


class BlockGrammars:
    """The constrained requests of a block: their masks per draft position and how far each matcher moved."""

    def __init__(
        self, reqs: list[Request], num_drafts: list[int], vocab_size: int, device: torch.device
    ) -> None:
        self.grammars: list[RequestGrammar | None] = [r.grammar for r in reqs]
        self.device = device
        # masks[b][j]: request b's bitmask after j drafts, for j < filled[b] (none after a completed grammar).
        self.masks: list[torch.Tensor | None] = [
            None if g is None else host_bitmask(k + 1, vocab_size, device)
            for g, k in zip(self.grammars, num_drafts)
        ]
        self.filled = [0] * len(reqs)
        self.advanced = [0] * len(reqs)
        for b in range(len(reqs)):
            self._fill(b)

    @property
    def any(self) -> bool:
        return any(g is not None for g in self.grammars)

    def _fill(self, b: int) -> None:
        grammar, masks, j = self.grammars[b], self.masks[b], self.filled[b]
        if grammar is not None and masks is not None and j < masks.shape[0] and not grammar.terminated:
            grammar.fill(masks, j)
            self.filled[b] += 1

    def accept(self, b: int, token: int) -> bool:
        """Advance request b through its next draft; False, nothing changed, when the grammar refuses it."""
        grammar = self.grammars[b]
        if grammar is None:
            return True
        if not grammar.accept(token):
            return False
        self.advanced[b] += 1
        self._fill(b)
        return True

    def may_draft(self, b: int) -> bool:
        """Whether request b's grammar lets a further draft follow (it has not terminated)."""
        grammar = self.grammars[b]
        return grammar is None or not grammar.terminated

    def bitmask(self, rows: list[tuple[int, int]]) -> TokenBitmask | None:
        """The mask of a batch whose row i is request rows[i][0] after rows[i][1] drafts; rows without one
        (unconstrained requests, positions past a completed grammar) stay unconstrained."""
        picked = [(i, b, j) for i, (b, j) in enumerate(rows) if j < self.filled[b]]
        if not picked:
            return None
        host = torch.stack([self.masks[b][j] for _, b, j in picked])  # type: ignore[index]
        return TokenBitmask.to_device([i for i, _, _ in picked], host, self.device)

    def rollback(self) -> None:
        """Every matcher back where the block started."""
        for b, grammar in enumerate(self.grammars):
            if grammar is not None:
                grammar.rollback(self.advanced[b])
                self.advanced[b] = 0
