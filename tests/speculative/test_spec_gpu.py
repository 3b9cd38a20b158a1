"""Speculative decoding on the GPU (run on the GPU machine, not in CI): the Triton backend verifies ragged
blocks (q_len = k_b + 1 per request) and greedy outputs equal plain decoding of the target, on one GPU
(standard, and EasySpec's attention sublayers batched) and across two TP ranks with layer-parallel drafting.
float32: the MoE layers' grouped GEMM is not captured in it, so these blocks run eagerly
(test_spec_graphs_gpu.py covers the graphs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tpla_serve import Engine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROOT = Path(__file__).resolve().parents[2]
TARGET = str(ROOT / "models" / "mla-tiny")
DRAFT = str(ROOT / "models" / "mla-tiny-draft")
PROMPTS = ["def fibonacci(n):", "The quick brown fox", "import numpy as np\n", "class Engine:\n    def __init__(self"]
PARAMS = [{"temperature": 0, "max_new_tokens": n, "ignore_eos": True} for n in (3, 17, 32, 48)]


def _generate(**kw) -> list[list[int]]:
    with Engine(model_path=TARGET, device="cuda", dtype="float32", attention_backend="triton", **kw) as engine:
        return [o["output_ids"] for o in engine.generate(PROMPTS, PARAMS)]


@pytest.mark.parametrize("tp_size,algorithm", [(1, "standard"), (1, "easyspec"), (2, "easyspec")])
def test_speculative_greedy_equals_plain_on_gpu(tp_size: int, algorithm: str) -> None:
    if torch.cuda.device_count() < tp_size:
        pytest.skip(f"needs {tp_size} GPUs")
    plain = _generate(tp_size=tp_size)
    spec = _generate(
        tp_size=tp_size, speculative_algorithm=algorithm, speculative_draft_model_path=DRAFT,
        speculative_num_draft_tokens=4,
    )
    assert spec == plain
