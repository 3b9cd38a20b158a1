"""Held-out metrics: perplexity, next-token accuracy, and greedy agreement with a reference model.

Greedy agreement is the fraction of held-out positions where a model's argmax equals the reference's
argmax, both given the same true prefix: a proxy for how often greedy speculation is accepted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.data import eval_windows


@dataclass(frozen=True)
class Score:
    tokens: int
    mean_nll: float
    accuracy: float
    agreement: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


@torch.no_grad()
def evaluate_models(
    models: Sequence[torch.nn.Module],
    stream: torch.Tensor,
    seq_len: int,
    batch_size: int,
    device: torch.device,
) -> list[Score]:
    """Score each model on the stream; `agreement` is measured against models[0] (1.0 for itself)."""
    if not models:
        raise ValueError("models: empty")
    nll = [0.0] * len(models)
    correct = [0] * len(models)
    agree = [0] * len(models)
    tokens = 0
    for window in eval_windows(stream, seq_len, batch_size):
        window = window.to(device)
        inputs, labels = window[:, :-1], window[:, 1:]
        reference: torch.Tensor | None = None
        for i, model in enumerate(models):
            logits = model(input_ids=inputs).logits.float()
            nll[i] += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
            predicted = logits.argmax(dim=-1)
            correct[i] += (predicted == labels).sum().item()
            if reference is None:
                reference = predicted
            agree[i] += (predicted == reference).sum().item()
        tokens += labels.numel()
    if tokens == 0:
        raise ValueError("stream: too short to score")
    return [
        Score(tokens, nll[i] / tokens, correct[i] / tokens, agree[i] / tokens) for i in range(len(models))
    ]
