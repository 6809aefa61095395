"""Live numbers for the System tab: requests in flight and tokens per second, per second bucket."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

WINDOW_SECONDS = 120


@dataclass(frozen=True)
class StatsSnapshot:
    active_requests: int
    finished_requests: int
    cancelled_requests: int
    failed_requests: int
    tokens_per_second: float  # over the last 10 s
    history: list[tuple[float, float]]  # (seconds ago, tok/s in that second), oldest first


class RequestObserver(Protocol):
    """What else hears of each counted request (backend.metrics.Metrics): times and counts, never text."""

    def first_token(self, seconds: float) -> None: ...

    def tokens(self, count: int, seconds_since_last: float | None) -> None: ...

    def ended(
        self, outcome: str, finish_reason: str | None, prompt_tokens: int | None, seconds: float
    ) -> None: ...


class RequestStats:
    """Counters shared by all requests of one service; every method is thread-safe."""

    def __init__(self, clock=time.monotonic, observer: RequestObserver | None = None):
        self._clock = clock
        self._observer = observer
        self._lock = threading.Lock()
        self._active = 0
        self._outcomes = {"finished": 0, "cancelled": 0, "failed": 0}
        self._buckets: deque[list[float]] = deque()  # [second, tokens]

    def started(self) -> None:
        with self._lock:
            self._active += 1

    def ended(self, outcome: str) -> None:
        """`outcome` is "finished", "cancelled" or "failed"."""
        with self._lock:
            self._active -= 1
            self._outcomes[outcome] += 1

    def add_tokens(self, count: int = 1) -> None:
        second = int(self._clock())
        with self._lock:
            if self._buckets and self._buckets[-1][0] == second:
                self._buckets[-1][1] += count
            else:
                self._buckets.append([second, count])
            self._drop_old(second)

    def counted(self, replies: Iterator) -> Iterator:
        """Pass `replies` through, counting them; a closed stream (Stop, disconnect) counts as cancelled."""
        self.started()
        outcome, seen, last = "cancelled", 0, None
        start = self._clock()
        reply = None
        try:
            for reply in replies:
                new = reply.new_tokens - seen
                self.add_tokens(new)
                if new > 0 and self._observer is not None:
                    now = self._clock()
                    if last is None:
                        self._observer.first_token(now - start)
                    self._observer.tokens(new, None if last is None else now - last)
                    last = now
                seen = reply.new_tokens
                yield reply
            outcome = "finished"
        except Exception:
            outcome = "failed"
            raise
        finally:
            self.ended(outcome)
            if self._observer is not None:
                reason, prompt = (
                    (reply.finish_reason, reply.prompt_tokens) if reply is not None else (None, None)
                )
                self._observer.ended(outcome, reason, prompt, self._clock() - start)

    def snapshot(self) -> StatsSnapshot:
        now = int(self._clock())
        with self._lock:
            self._drop_old(now)
            recent = sum(tokens for second, tokens in self._buckets if now - second < 10)
            counts = {second: tokens for second, tokens in self._buckets}
            first = self._buckets[0][0] if self._buckets else now
            # Idle seconds are zeros, not gaps, so the chart shows when nothing was generated.
            history = [
                (float(now - second), float(counts.get(second, 0))) for second in range(first, now + 1)
            ]
            outcomes = self._outcomes
            return StatsSnapshot(
                self._active,
                outcomes["finished"],
                outcomes["cancelled"],
                outcomes["failed"],
                recent / 10.0,
                history,
            )

    def _drop_old(self, now: int) -> None:
        while self._buckets and now - self._buckets[0][0] >= WINDOW_SECONDS:
            self._buckets.popleft()
