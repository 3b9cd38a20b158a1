"""The engine on CUDA: greedy outputs identical across attention backends (run on a GPU machine)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tpla_serve import Engine

pytestmark = pytest.mark.gpu
MODEL = str(Path(__file__).resolve().parents[2] / "models" / "mla-tiny")
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Engine:\n    def __init__(self"]


def greedy(backend: str, **kw) -> list[list[int]]:
    with Engine(model_path=MODEL, device="cuda", dtype="float32", attention_backend=backend, **kw) as engine:
        outs = engine.generate(PROMPTS, {"max_new_tokens": 32, "temperature": 0, "ignore_eos": True})
        return [o["output_ids"] for o in outs]


def test_triton_and_torch_backends_agree_single_gpu():
    assert greedy("triton") == greedy("torch")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("groups", [1, 2])
def test_triton_and_torch_backends_agree_tp2(groups):
    assert greedy("triton", tp_size=2, tpla_groups=groups) == greedy("torch", tp_size=2, tpla_groups=groups)
