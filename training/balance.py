"""Auxiliary-loss-free expert load balancing, as DeepSeek-V3 trains its routers.

Each router's `e_score_correction_bias` only affects which experts are chosen, not their weights. After every
optimizer step the bias of an overloaded expert goes down by `rate` and that of an underloaded one goes up.
"""

from __future__ import annotations

import torch
from torch.utils.hooks import RemovableHandle
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter


class ExpertLoadBalancer:
    def __init__(self, model: torch.nn.Module, rate: float) -> None:
        if rate < 0:
            raise ValueError(f"rate: must be >= 0, got {rate}")
        self.rate = rate
        self.routers = [m for m in model.modules() if isinstance(m, DeepseekV3TopkRouter)]
        self._counts: dict[int, torch.Tensor] = {}
        self._last_loads: list[torch.Tensor] = []
        self._handles: list[RemovableHandle] = [r.register_forward_hook(self._record) for r in self.routers]

    def _record(self, router: DeepseekV3TopkRouter, _inputs: tuple, outputs: tuple) -> None:
        # The router returns (logits, top-k weights, top-k expert indices).
        if not router.training:
            return
        counts = torch.bincount(outputs[2].flatten(), minlength=router.num_experts)
        key = id(router)
        self._counts[key] = self._counts[key] + counts if key in self._counts else counts

    @torch.no_grad()
    def step(self) -> None:
        """Apply the bias update for the loads seen since the last step (no host synchronisation)."""
        self._last_loads = []
        for router in self.routers:
            counts = self._counts.pop(id(router), None)
            if counts is None:
                continue
            load = counts.float()
            bias = router.e_score_correction_bias
            bias.add_(self.rate * torch.sign(load.mean() - load).to(bias.dtype))
            self._last_loads.append(load)

    def imbalance(self) -> float:
        """The worst max/mean expert load over the routers at the last step (1.0 is perfect balance)."""
        if not self._last_loads:
            return 1.0
        ratios = torch.stack([load.max() / load.mean().clamp(min=1.0) for load in self._last_loads])
        return ratios.max().item()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
