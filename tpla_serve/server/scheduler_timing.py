"""What the scheduler process measures for the metrics, beside the scheduler: queue times, generation rate.

Both cost O(1) amortized per step, read only the scheduler's public state, and keep bounded memory.
"""

from __future__ import annotations

from collections import deque

from tpla_serve.engine.request import Request, RequestStatus


class QueueTimes:
    """Seconds each request waited in the scheduler's queue before its prefill was scheduled.

    The queue admits in arrival order, so the requests still queued are a suffix of those tracked here:
    after a step, the head of the deque is popped while its request has left the queue.
    """

    def __init__(self) -> None:
        self._queued: deque[Request] = deque()
        self._waited: dict[str, float] = {}  # rid -> seconds, until the request's final output

    def track(self, req: Request) -> None:
        if req.status is RequestStatus.WAITING:
            self._queued.append(req)

    def scheduled(self, step_start: float) -> None:
        """After a step that began at `step_start`: the requests it admitted waited until then."""
        while self._queued and self._queued[0].status is not RequestStatus.WAITING:
            req = self._queued.popleft()
            if req.status is not RequestStatus.FINISHED or req.output_ids:
                self._waited[req.rid] = max(0.0, step_start - req.arrival_time)

    def pop(self, rid: str) -> float | None:
        return self._waited.pop(rid, None)


class Throughput:
    """Tokens generated per second over about the last `window_s` seconds (SGLang's gen_throughput)."""

    def __init__(self, window_s: float = 10.0, every_s: float = 1.0) -> None:
        self.window_s = window_s
        self.every_s = every_s
        self._samples: deque[tuple[float, int]] = deque()

    def sample(self, now: float, generated: int) -> None:
        if not self._samples or now - self._samples[-1][0] >= self.every_s:
            self._samples.append((now, generated))
        self._prune(now)

    def rate(self, now: float, generated: int) -> float:
        self._prune(now)
        if not self._samples or now <= self._samples[0][0]:
            return 0.0
        start, base = self._samples[0]
        return (generated - base) / (now - start)

    def _prune(self, now: float) -> None:
        while len(self._samples) > 1 and self._samples[1][0] <= now - self.window_s:
            self._samples.popleft()
