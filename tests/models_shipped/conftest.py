"""The shipped models (models/mla-tiny, models/mla-tiny-draft) in transformers and in our engine, fp32 on CPU."""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
SHIPPED = {"target": MODELS_DIR / "mla-tiny", "draft": MODELS_DIR / "mla-tiny-draft"}
SEQ_LEN = 320


@pytest.fixture(autouse=True, scope="package")
def _single_thread() -> Iterator[None]:
    """Tiny ops on a shared 2-core machine run faster without OpenMP spin-waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="package", params=sorted(SHIPPED), ids=sorted(SHIPPED))
def model_dir(request: pytest.FixtureRequest) -> Path:
    return SHIPPED[request.param]


@pytest.fixture(scope="package")
def hf_model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


@pytest.fixture(scope="package")
def engine(model_dir: Path) -> Iterator[object]:
    from tpla_serve import Engine

    with Engine(model_path=str(model_dir), dtype="float32", device="cpu") as e:
        yield e


@pytest.fixture(scope="package")
def source_tokens() -> list[int]:
    """BOS + the first tokens of a standard-library file, as the models saw files in training (both models
    share one tokenizer)."""
    from tpla_serve.engine.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(SHIPPED["target"]))
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    ids = [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)]
    assert len(ids) >= SEQ_LEN
    return ids[:SEQ_LEN]


@pytest.fixture(scope="package")
def hf_logits(hf_model: torch.nn.Module, source_tokens: list[int]) -> torch.Tensor:
    """transformers' logits [SEQ_LEN, vocab] of every position: the reference."""
    with torch.no_grad():
        return hf_model(torch.tensor([source_tokens])).logits[0].float()
