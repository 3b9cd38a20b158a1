"""RMSNorm with the reference rounding: normalize in fp32, round to the input dtype, then scale."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tpla_serve.layers.linear import load_full


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = load_full  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Rounding before the weight multiply (not after) is what DeepSeek's and transformers' code do;
        # in bf16 the two orders give different logits.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
