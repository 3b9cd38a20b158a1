"""A step's sampled tokens on their way to the host.

On a GPU the tokens (and logprobs) are copied into pinned host buffers without waiting, behind the step's
kernels; the host reads them once an event says the step is done, which may be while the next step already
runs (overlap scheduling). On the CPU they are simply there.
"""

from __future__ import annotations

import torch

from tpla_serve.sampling.logprobs import TokenLogprobs
from tpla_serve.sampling.sampler import SamplerOutput


class SampledTokens:
    def __init__(self, out: SamplerOutput) -> None:
        self._event: torch.cuda.Event | None = None
        if out.next_token_ids.is_cuda:
            out = SamplerOutput(*(_to_pinned(t) for t in out[:4]), out.top_logprobs_nums)
            self._event = torch.cuda.Event()
            self._event.record()
        self._out = out

    def result(self) -> tuple[list[int], TokenLogprobs | None]:
        """(token ids, their logprobs when computed): waits for this step's work only."""
        if self._event is not None:
            self._event.synchronize()
        return self._out.tolist()


def _to_pinned(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host
