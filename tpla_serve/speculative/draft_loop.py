"""A speculation block's drafting, as every rank that holds a draft runs it from one RunDraftBlock.

1. Calibration: the exact sequential draft step over each request's tokens whose draft KV is not exact yet
   (`op.calibration`); its logits give d_1.
2. k_max - 1 draft decode steps over the block's B requests: step j feeds d_j at positions[b] + j - 1 and
   gives d_{j+1}. Every step has all B rows: a request that already has its num_drafts[b] tokens stays in,
   parked at positions[b] + num_drafts[b] - 1, where its last draft would be fed. That position is within
   its pages, and its draft KV is never kept (a block's exact draft KV ends before it), so the parked row
   changes nothing anyone reads. Each step therefore has the same rows and shape, its inputs are gathers
   over the request table plus the last step's tokens, on the device, and nothing waits for the host
   between steps unless the tokens source needs them there (grammars, penalties).

Rank 0 draws each step's tokens (`TokenSource`, the decoder's sampler); under layer-parallel drafting it
broadcasts them and the other ranks receive them, so every rank feeds the same tokens. A block whose drafts
are all the argmax of the raw draft logits (greedy, no penalties, min_new_tokens or grammar) needs no
broadcast: every rank computes the same logits (replicated layers; the group all-reduce adds exact zeros to
each rank's own sublayer output) and takes the argmax itself. Ranks that disagreed would only make the
drafts fuzzier: verification, on rank 0's drafts, decides what is emitted.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from tpla_serve.distributed import RunDraftBlock
from tpla_serve.engine.request_table import RequestTable
from tpla_serve.speculative.draft import DraftModel


class TokenSource(Protocol):
    def __call__(self, index: int, logits: torch.Tensor | None) -> torch.Tensor:
        """Draft token `index` (0-based: d_{index+1}) of every row, [B] int64 on the device: rank 0 draws it
        from the draft's logits [B, V]; the other ranks (logits None) receive rank 0's."""
        ...


def received_tokens(op: RunDraftBlock, device: torch.device) -> TokenSource:
    """A rank > 0's TokenSource: each draft token comes from rank 0, by a broadcast, or is the argmax of the
    rank's own logits (`op.local_argmax`)."""
    if op.local_argmax:
        return lambda index, logits: logits.argmax(dim=-1)  # type: ignore[union-attr]

    def receive(index: int, logits: torch.Tensor | None) -> torch.Tensor:
        tokens = torch.empty(len(op.slots), dtype=torch.int64, device=device)
        dist.broadcast(tokens, src=0)
        return tokens

    return receive


def step_positions(positions: np.ndarray, num_drafts: np.ndarray, step: int) -> np.ndarray:
    """Where decode step `step` >= 1 feeds each row's input d_step: positions + step - 1, or the row's
    parking position positions + num_drafts - 1 once it has all its drafts."""
    return positions + np.minimum(step - 1, num_drafts - 1)


def run_draft_block(
    draft: DraftModel, table: RequestTable, op: RunDraftBlock, tokens: TokenSource
) -> torch.Tensor:
    """The block's draft tokens [B, k_max] int64 on the device; row b's first num_drafts[b] are its drafts."""
    if op.delta:
        table.apply(op.delta)
    k_max = int(op.num_drafts.max())
    out = torch.empty(len(op.slots), k_max, dtype=torch.int64, device=draft.device)
    every_rank = op.local_argmax  # every rank needs its logits
    out[:, 0] = tokens(0, draft.forward_local(op.mode, op.calibration, exact=True, all_ranks=every_rank))
    for step in range(1, k_max):
        positions = step_positions(op.positions, op.num_drafts, step)
        logits = draft.decode_from_table(table, op.slots, positions, out[:, step - 1], all_ranks=every_rank)
        out[:, step] = tokens(step, logits)
    return out
