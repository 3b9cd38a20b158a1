"""EasySpec's draft forward written out sublayer by sublayer: the reference the batched groups are checked against."""

from __future__ import annotations

import torch


def grouped_logits(model, fb, groups: list[list[int]]) -> torch.Tensor:
    """Logits of a draft step where each group of layers runs its attention sublayers on the group's one
    input and then its MLPs in order (a group of one layer is an ordinary layer)."""
    with torch.inference_mode():
        x, cos, sin = model.embed(fb)
        for group in groups:
            if len(group) == 1:
                x = model.layers[group[0]](x, cos, sin, fb)
                continue
            attn = [model.layers[i].attention(x, cos, sin, fb) for i in group]
            for i, a in zip(group, attn):
                x = x + a
                x = x + model.layers[i].feed_forward(x)
        return model.logits(x, fb)
