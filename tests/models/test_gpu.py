"""The model on a CUDA device: the same comparison with transformers as on the CPU, bf16 against fp32, and
dummy weights for the whole DeepSeek-V2-Lite initialized on the device."""

from __future__ import annotations

import time

import pytest
import torch
from model_test_utils import (
    HF_CASES,
    assert_bf16_no_worse_than_transformers,
    assert_close_rel,
    hf_logits,
    prefill_then_decode,
    save_hf_case,
)

from tpla_serve.models import builtin_config, load_model

pytestmark = pytest.mark.gpu

TOKENS = [(7 * i + 3) % 128 for i in range(192)]


@pytest.mark.parametrize("name", sorted(HF_CASES))
def test_matches_transformers_on_cuda(name: str, tmp_path) -> None:
    hf_model = save_hf_case(name, tmp_path).to("cuda")
    ours = load_model(tmp_path, dtype=torch.float32, device="cuda", show_progress=False)
    ref = hf_logits(hf_model, TOKENS)
    assert_close_rel(prefill_then_decode(ours, TOKENS, 64), ref, f"{name} on cuda")


def test_bf16_as_close_to_fp32_as_transformers_bf16(tmp_path) -> None:
    hf_model = save_hf_case("v3-qlora-noauxtc-norm-yarn-interleave", tmp_path).to("cuda")
    ours = load_model(tmp_path, dtype=torch.bfloat16, device="cuda", show_progress=False)
    ref = hf_logits(hf_model, TOKENS)
    assert_bf16_no_worse_than_transformers(
        prefill_then_decode(ours, TOKENS, 64), hf_logits(hf_model.to(torch.bfloat16), TOKENS), ref
    )


def test_dummy_deepseek_v2_lite_full_depth() -> None:
    torch.cuda.synchronize()
    start = time.perf_counter()
    model = load_model(
        builtin_config("deepseek-v2-lite"), dtype=torch.bfloat16, device="cuda", load_format="dummy"
    )
    torch.cuda.synchronize()
    print(f"dummy DeepSeek-V2-Lite (27 layers, bf16) initialized in {time.perf_counter() - start:.1f} s")
    logits = prefill_then_decode(model, [(37 * i) % 102400 for i in range(520)], 512)
    assert logits.shape == (520, 102400) and torch.isfinite(logits).all()
