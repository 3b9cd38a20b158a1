"""The Triton backend on DECODE steps with ragged query lengths (speculative verification), through
Triton's CPU interpreter, against the plain torch backend."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from kernel_case import rel_err
from ragged_case import ragged_decode

# (requests as (prefix_len, q_len), ckv, page_size, dtype, nope_scale). Request (0, 1) has a single KV
# token, so three of its four padded rows see no key at all.
CASES = [
    ([(20, 4), (0, 1), (9, 2)], 128, 4, torch.float32, 1.0),
    ([(33, 1), (5, 3), (40, 5)], 256, 16, torch.bfloat16, 0.7),
]


@pytest.mark.parametrize("requests,ckv,page_size,dtype,nope_scale", CASES)
def test_ragged_q_lens_match_torch_backend(
    interp: SimpleNamespace, requests: list[tuple[int, int]], ckv: int, page_size: int, dtype: torch.dtype,
    nope_scale: float,
) -> None:
    args = (11, requests, ckv, page_size, dtype, nope_scale)
    out = interp._call("ragged_case", "ragged_decode", "triton", *args)
    ref = ragged_decode("torch", *args)
    assert out.shape == ref.shape == (sum(q for _, q in requests), 4, ckv)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
