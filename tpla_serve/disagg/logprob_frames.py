"""The logprobs DONE carries to decode rank 0 (the prompt's, the first token's top-k), as tensors that
travel as raw frames."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PromptLogprobs:
    """Logprobs of prompt tokens start.. (float32 [m]) and optionally their top-k (values and ids [m, k])."""

    start: int
    logprobs: torch.Tensor
    top_logprobs: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.logprobs.dim() != 1 or self.logprobs.dtype != torch.float32:
            raise ValueError("PromptLogprobs.logprobs must be a float32 [m] tensor")
        if (self.top_logprobs is None) != (self.top_ids is None):
            raise ValueError("PromptLogprobs.top_logprobs and top_ids must be given together")
        if self.top_logprobs is not None and self.top_ids is not None:
            m = self.logprobs.shape[0]
            if self.top_logprobs.dtype != torch.float32 or self.top_ids.dtype != torch.int32:
                raise ValueError("PromptLogprobs top values must be float32 and top ids int32")
            if self.top_logprobs.dim() != 2 or self.top_logprobs.shape[0] != m:
                raise ValueError(f"PromptLogprobs.top_logprobs must be [{m}, k]")
            if self.top_ids.shape != self.top_logprobs.shape:
                raise ValueError("PromptLogprobs.top_ids must have the shape of top_logprobs")

    @property
    def top_k(self) -> int:
        return 0 if self.top_logprobs is None else self.top_logprobs.shape[1]


@dataclass(frozen=True)
class TopLogprobs:
    """The k most likely tokens at one position: logprobs (float32 [k], descending) and ids (int32 [k])."""

    logprobs: torch.Tensor
    ids: torch.Tensor

    def __post_init__(self) -> None:
        if self.logprobs.dim() != 1 or self.logprobs.dtype != torch.float32 or self.ids.dtype != torch.int32:
            raise ValueError("TopLogprobs must be a float32 [k] tensor of logprobs and an int32 one of ids")
        if self.ids.shape != self.logprobs.shape:
            raise ValueError("TopLogprobs.ids must have the shape of its logprobs")
