"""Requests with cached prompts and the decode step that follows, on a ModelRunner (CPU or GPU tests)."""

from __future__ import annotations

import torch

from tpla_serve.forward_batch import BatchEntry, ForwardMode
from tpla_serve.engine.model_runner import ModelRunner


def prefilled_decode_entries(runner: ModelRunner, prompt_lens: list[int], seed: int) -> list[BatchEntry]:
    """Prefill random prompts of the given lengths, then return their next decode step's entries
    (one new token each, room for it in the pages)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = runner.model_config.vocab_size
    page = runner.page_size
    prompts = [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in prompt_lens]
    pages = [runner.allocator.alloc(-(-(n + 1) // page)) for n in prompt_lens]
    if any(p is None for p in pages):
        raise RuntimeError("the KV pool is too small for the test's prompts")
    runner.forward(ForwardMode.EXTEND, [BatchEntry(ids, 0, p) for ids, p in zip(prompts, pages)])
    nxt = torch.randint(2, vocab, (len(prompts),), generator=gen).tolist()
    return [BatchEntry([t], n, p) for t, n, p in zip(nxt, prompt_lens, pages)]
