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


@pytest.mark.parametrize("backend", ["triton", "flashinfer"])
def test_prefix_cache_hits_decode_exactly_as_recomputed_prompts(backend):
    """Shared prefixes from the cache on CUDA (page size 64: a 200-token system prompt spans 3 whole pages):
    greedy tokens equal the uncached engine's, request by request."""
    if backend == "flashinfer":
        pytest.importorskip("flashinfer")
    system = "You are a careful Python programmer. Answer with code only, no prose. " * 8
    prompts = [system + p for p in PROMPTS] + [system + PROMPTS[0] + " # again"]
    params = {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}
    outs = {}
    for disable in (True, False):
        with Engine(model_path=MODEL, device="cuda", dtype="float32", attention_backend=backend,
                    disable_radix_cache=disable) as engine:
            first = engine.generate(prompts[0], params)
            rest = engine.generate(prompts[1:], params)
            outs[disable] = [first["output_ids"]] + [o["output_ids"] for o in rest]
            if not disable:
                assert all(o["meta_info"]["cached_tokens"] >= 128 for o in rest)
    assert outs[False] == outs[True]
