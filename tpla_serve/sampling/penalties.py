"""Logit penalties over a request's generated tokens, and the min_new_tokens stop-token mask.

Semantics follow SGLang's penaltylib: all three penalties count only *generated* tokens (the prompt
is not counted), `frequency` scales with the count, `presence` is flat once a token appeared, and
`repetition` divides positive logits / multiplies negative ones. The multiplicative repetition
penalty is applied before the additive ones. Everything here works on a subset of rows given as an
index tensor, so a batch where few requests ask for penalties pays only for those.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def host_to_device(data: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor without stalling the device queue (pinned, non-blocking)."""
    t = torch.tensor(data, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass(frozen=True)
class PenaltyInputs:
    """Penalty state of the R penalized rows of a batch, on the device."""

    rows: torch.Tensor  # [R] int64 rows of the batch
    counts: torch.Tensor  # [R, V] float32 occurrences of each token in the row's generated tokens
    frequency: torch.Tensor  # [R, 1] float32
    presence: torch.Tensor  # [R, 1] float32
    repetition: torch.Tensor  # [R, 1] float32

    @classmethod
    def build(
        cls,
        rows: Sequence[int],
        output_ids: Sequence[Sequence[int]],
        frequency: Sequence[float],
        presence: Sequence[float],
        repetition: Sequence[float],
        vocab_size: int,
        device: torch.device,
    ) -> PenaltyInputs:
        """`output_ids[j]` are the generated tokens of batch row `rows[j]`."""
        flat_rows = [j for j, ids in enumerate(output_ids) for _ in ids]
        flat_ids = [t for ids in output_ids for t in ids]
        counts = torch.zeros((len(rows), vocab_size), dtype=torch.float32, device=device)
        if flat_ids:
            counts.index_put_(
                (
                    host_to_device(flat_rows, torch.int64, device),
                    host_to_device(flat_ids, torch.int64, device),
                ),
                torch.ones((), dtype=torch.float32, device=device),
                accumulate=True,
            )

        def column(values: Sequence[float]) -> torch.Tensor:
            return host_to_device(list(values), torch.float32, device).unsqueeze(1)

        return cls(
            rows=host_to_device(list(rows), torch.int64, device),
            counts=counts,
            frequency=column(frequency),
            presence=column(presence),
            repetition=column(repetition),
        )


def penalize(
    logits: torch.Tensor,
    counts: torch.Tensor,
    frequency: torch.Tensor,
    presence: torch.Tensor,
    repetition: torch.Tensor,
) -> torch.Tensor:
    """Penalized copy of `logits` [R, V] given per-row token counts [R, V] and [R, 1] penalties."""
    seen = counts > 0
    scaled = torch.where(logits > 0, logits / repetition, logits * repetition)
    out = torch.where(seen, scaled, logits)
    return out - frequency * counts - presence * seen.to(logits.dtype)


def apply_penalties(logits: torch.Tensor, p: PenaltyInputs) -> None:
    """Penalize rows `p.rows` of `logits` [B, V] in place."""
    sub = logits.index_select(0, p.rows)
    logits.index_copy_(0, p.rows, penalize(sub, p.counts, p.frequency, p.presence, p.repetition))


@dataclass(frozen=True)
class StopTokenMask:
    """(row, token) pairs to forbid this step: EOS and stop_token_ids of requests still short of
    min_new_tokens (SGLang masks them whether or not ignore_eos is set)."""

    rows: torch.Tensor  # [M] int64
    tokens: torch.Tensor  # [M] int64

    @classmethod
    def build(
        cls, rows: Sequence[int], token_sets: Sequence[Sequence[int]], device: torch.device
    ) -> StopTokenMask:
        flat_rows = [r for r, toks in zip(rows, token_sets) for _ in toks]
        flat_toks = [t for toks in token_sets for t in toks]
        return cls(
            host_to_device(flat_rows, torch.int64, device), host_to_device(flat_toks, torch.int64, device)
        )

    def apply(self, logits: torch.Tensor) -> None:
        logits.index_put_((self.rows, self.tokens), logits.new_full((), float("-inf")))
