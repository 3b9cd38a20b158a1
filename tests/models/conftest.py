"""Shared set-up of the model tests: no hub access, single-threaded torch (tiny ops on a shared 2-core
machine run many times faster without OpenMP spin-waiting)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="package")
def _single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="package")
def hf_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Every HF_CASES model, saved once by transformers: name -> (directory, transformers model)."""
    from model_test_utils import HF_CASES, save_hf_case

    root = tmp_path_factory.mktemp("hf_checkpoints")
    return {name: (root / name, save_hf_case(name, root / name)) for name in HF_CASES}
