"""Load-oblivious and load-sampling policies: round_robin, random, power_of_two."""

from __future__ import annotations

import random
from collections.abc import Sequence

from .base import Policy, W


class RoundRobinPolicy(Policy):
    def __init__(self) -> None:
        self._next = 0

    def select(self, workers: Sequence[W], key: str | None) -> W:
        worker = workers[self._next % len(workers)]
        self._next += 1
        return worker


class RandomPolicy(Policy):
    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def select(self, workers: Sequence[W], key: str | None) -> W:
        return workers[self._rng.randrange(len(workers))]


class PowerOfTwoPolicy(Policy):
    """Sample two distinct workers, take the one with fewer in-flight requests.

    Nearly as good as least-loaded while avoiding the herd effect of every router instance piling onto
    the same minimum.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def select(self, workers: Sequence[W], key: str | None) -> W:
        if len(workers) == 1:
            return workers[0]
        a, b = self._rng.sample(range(len(workers)), 2)
        return workers[a] if workers[a].in_flight <= workers[b].in_flight else workers[b]
