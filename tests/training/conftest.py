"""Shared fixtures for the training tests: the stdlib corpus split and a small trained tokenizer."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def stdlib_split():
    from training.corpus import load_split

    return load_split()


@pytest.fixture(scope="session")
def small_tokenizer(stdlib_split):
    """A 600-entry BPE trained on a slice of the training split."""
    from training.tokenizer import train_tokenizer

    return train_tokenizer([f.text for f in stdlib_split.train[:30]], vocab_size=600)
