"""Parallel sampling (SGLang's `sampling_params.n`, OpenAI's `n`): a prompt asked for n samples becomes n
requests.

The copies are queued together, so the first computes the prompt and the others wait for it and read its
whole pages from the prefix cache (the scheduler's in-batch prefix check): the prompt is prefilled once,
and each copy computes only its partial last page and its own tokens. Copies are ordered as SGLang orders
them, copy-major: every prompt's first sample, then every prompt's second, and so on (item k is prompt
k % B's copy k // B). A request with a sampling_seed gives copy j the seed + j, so its samples differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

MAX_PARALLEL_SAMPLES = 128  # OpenAI's bound on n
SEED_RANGE = 1 << 64


def parallel_samples(sampling_params: Sequence[dict[str, Any] | None]) -> int:
    """The n of a batch: one value for every prompt, as SGLang requires. ValueError names the field."""
    values = [1 if p is None or p.get("n") is None else p["n"] for p in sampling_params]
    n = values[0] if values else 1
    if any(v != n or type(v) is not type(n) for v in values):
        raise ValueError(f"n: every prompt of a batch must ask for the same number of samples, got {values}")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_PARALLEL_SAMPLES:
        raise ValueError(f"n must be an integer in [1, {MAX_PARALLEL_SAMPLES}], got {n!r}")
    return n


def copy_params(sampling_params: dict[str, Any] | None, copy: int) -> dict[str, Any]:
    """Sampling params of one sample: n dropped, and copy j > 0 seeded with sampling_seed + j."""
    params = dict(sampling_params or {})
    params.pop("n", None)
    seed = params.get("sampling_seed")
    if copy and isinstance(seed, int) and not isinstance(seed, bool):
        shifted = seed + copy
        params["sampling_seed"] = shifted - SEED_RANGE if shifted >= SEED_RANGE else shifted
    return params


def expand(items: Sequence[Any], copies: int) -> list[Any]:
    """A per-prompt list in the copies' order (copy-major)."""
    return list(items) * copies
