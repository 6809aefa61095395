"""Live engine numbers: outcomes counted once, tokens per second over a window, idle seconds as zeros."""

from __future__ import annotations

from backend.request_stats import WINDOW_SECONDS, RequestStats


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_outcomes_and_active_requests():
    stats = RequestStats(FakeClock())
    for _ in range(3):
        stats.started()
    stats.ended("finished")
    stats.ended("cancelled")
    snapshot = stats.snapshot()
    assert (snapshot.active_requests, snapshot.finished_requests, snapshot.cancelled_requests) == (1, 1, 1)
    assert snapshot.failed_requests == 0


def test_tokens_per_second_and_history():
    clock = FakeClock()
    stats = RequestStats(clock)
    stats.add_tokens(30)
    clock.now += 3
    stats.add_tokens(20)
    snapshot = stats.snapshot()
    assert snapshot.tokens_per_second == 5.0  # 50 tokens in the last 10 s
    assert snapshot.history == [(3.0, 30.0), (2.0, 0.0), (1.0, 0.0), (0.0, 20.0)]
    clock.now += WINDOW_SECONDS + 1
    later = stats.snapshot()
    assert later.tokens_per_second == 0.0 and later.history == [(0.0, 0.0)]
