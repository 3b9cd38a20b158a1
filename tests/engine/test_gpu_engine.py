"""The engine on CUDA: greedy outputs identical across attention backends (run on a GPU machine)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from tpla_serve import Engine
from tpla_serve.models.registry import builtin_config

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


def _prefix_cache_outputs(engine_args: dict, prompts: list, params: dict) -> dict[bool, list[list[int]]]:
    outs = {}
    for disable in (True, False):
        with Engine(**engine_args, disable_radix_cache=disable) as engine:
            first = engine.generate(input_ids=prompts[0], sampling_params=params)
            rest = engine.generate(input_ids=prompts[1:], sampling_params=params)
            outs[disable] = [first["output_ids"]] + [o["output_ids"] for o in rest]
            if not disable:
                assert all(o["meta_info"]["cached_tokens"] >= 128 for o in rest)
    return outs


def test_prefix_cache_hits_decode_exactly_as_recomputed_prompts_triton():
    """Shared prefixes from the cache on CUDA (page size 64: a 200-token system prompt spans 3 whole pages):
    greedy tokens equal the uncached engine's, request by request (the shipped model, fp32)."""
    tok = AutoTokenizer.from_pretrained(MODEL)
    system = tok.encode("You are a careful Python programmer. Answer with code only, no prose. " * 8)
    prompts = [system + tok.encode(p) for p in PROMPTS] + [system + tok.encode(PROMPTS[0] + " # again")]
    args = {"model_path": MODEL, "device": "cuda", "dtype": "float32", "attention_backend": "triton"}
    outs = _prefix_cache_outputs(args, prompts, {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True})
    assert outs[False] == outs[True]


def test_prefix_cache_hits_decode_exactly_as_recomputed_prompts_flashinfer():
    """The same on FlashInfer's MLA kernel, which needs its shapes (a 512-dim latent, bfloat16): DeepSeek-V2-
    Lite's attention with dummy weights, two dense layers."""
    pytest.importorskip("flashinfer")
    args = {"model_path": str(builtin_config("deepseek-v2-lite")), "load_format": "dummy", "device": "cuda", "dtype": "bfloat16",
            "attention_backend": "flashinfer", "skip_tokenizer_init": True,
            "json_model_override_args": '{"num_hidden_layers": 2, "first_k_dense_replace": 2}'}
    system = list(range(100, 300))
    prompts = [system + list(range(1000 + 50 * i, 1010 + 50 * i)) for i in range(4)]
    outs = _prefix_cache_outputs(args, prompts, {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True})
    assert outs[False] == outs[True]
