"""Torch work on threads that end: results, errors, cancellation, and the OpenMP teams they leave."""

from __future__ import annotations

import gc
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from backend.torch_threads import FreshThreadStream, call_on_fresh_thread


def native_threads() -> int:
    """OS threads Python did not start: OpenMP workers among them."""
    return len(os.listdir("/proc/self/task")) - threading.active_count()


def settled_native_threads(at_most: int | None = None, seconds: float = 5.0) -> int:
    """The count once unchanged for 0.3 s (or at most `at_most`): workers exit a moment after their master."""
    deadline = time.monotonic() + seconds
    count, since = native_threads(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.02)
        now = native_threads()
        if now != count:
            count, since = now, time.monotonic()
        elif at_most is not None and count <= at_most or time.monotonic() - since > 0.3:
            break
    return count


def parallel_op() -> float:
    return float(torch.randn(1500, 1500).sum())  # large enough for ATen to open an OpenMP region


def test_call_returns_the_result_from_a_thread_that_has_ended():
    ran_on = []

    def work(a, b=0):
        ran_on.append(threading.current_thread())
        return a + b

    assert call_on_fresh_thread(work, 2, b=3) == 5
    assert ran_on[0] is not threading.current_thread()
    assert not ran_on[0].is_alive()


def test_call_raises_the_functions_error_here():
    def broken():
        raise ValueError("bad prompt")

    with pytest.raises(ValueError, match="bad prompt"):
        call_on_fresh_thread(broken)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc")
def test_only_work_sent_through_a_fresh_thread_leaves_no_openmp_team_behind():
    """The failure this module exists for: a lasting thread that ran torch keeps its OpenMP team."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)  # a team of one has no workers to count
    release = threading.Event()
    try:
        call_on_fresh_thread(parallel_op)  # warm-up: anything torch starts once
        baseline = settled_native_threads()

        def lasting_handler(direct: bool, done: threading.Event):
            parallel_op() if direct else call_on_fresh_thread(parallel_op)
            done.set()
            release.wait()

        helped_done = threading.Event()
        threading.Thread(target=lasting_handler, args=(False, helped_done), daemon=True).start()
        assert helped_done.wait(30)
        assert settled_native_threads(at_most=baseline) <= baseline

        direct_done = threading.Event()
        threading.Thread(target=lasting_handler, args=(True, direct_done), daemon=True).start()
        assert direct_done.wait(30)
        assert settled_native_threads() > baseline  # the control: the team is there while its thread lives
    finally:
        release.set()
        torch.set_num_threads(previous)


def counting(events: list, limit: int | None = None):
    """A source that records where it runs and whether it was closed."""

    def start():
        events.append(("start", threading.current_thread()))

        def items():
            try:
                for i in range(limit if limit is not None else 10**9):
                    events.append(("item", threading.current_thread()))
                    yield i
            finally:
                events.append(("closed", threading.current_thread()))

        return items()

    return start


def test_stream_yields_every_item_in_order_on_one_thread_that_ends():
    events: list = []
    stream = FreshThreadStream(counting(events, limit=5))
    assert list(stream) == [0, 1, 2, 3, 4]
    threads = {thread for _, thread in events}
    assert len(threads) == 1
    (producer,) = threads
    assert producer is not threading.current_thread()
    producer.join(5)
    assert not producer.is_alive()
    assert events[-1][0] == "closed"


def test_a_start_error_raises_from_the_constructor():
    def start():
        raise ValueError("not an image")

    with pytest.raises(ValueError, match="not an image"):
        FreshThreadStream(start)


def test_an_error_mid_stream_raises_from_next():
    def start():
        def items():
            yield 1
            raise RuntimeError("out of memory")

        return items()

    stream = FreshThreadStream(start)
    assert next(stream) == 1
    with pytest.raises(RuntimeError, match="out of memory"):
        next(stream)
    with pytest.raises(StopIteration):
        next(stream)


def test_close_stops_an_endless_source_without_waiting_for_it():
    events: list = []
    ended = threading.Event()
    stream = FreshThreadStream(counting(events), on_end=ended.set)
    assert next(stream) == 0
    stream.close()
    with pytest.raises(StopIteration):
        next(stream)
    assert ended.wait(5)
    made = sum(1 for kind, _ in events if kind == "item")
    time.sleep(0.1)
    assert sum(1 for kind, _ in events if kind == "item") == made  # nothing made after the end
    assert events[-1][0] == "closed"  # the source's own cleanup ran (on the producer thread)
    assert events[-1][1] is not threading.current_thread()


def test_a_dropped_stream_stops_its_producer_and_reports_the_end():
    events: list = []
    ended = threading.Event()
    stream = FreshThreadStream(counting(events), on_end=ended.set)
    assert next(stream) == 0
    del stream
    gc.collect()
    assert ended.wait(5)  # the producer held no reference to the stream, so dropping it closed it
    assert events[-1][0] == "closed"


def test_on_end_runs_however_the_producer_stops():
    def broken_start():
        raise ValueError("bad image")

    def failing_start():
        def items():
            yield 1
            raise ValueError("in the middle")

        return items()

    ended = [threading.Event() for _ in range(3)]
    assert list(FreshThreadStream(counting([], limit=2), on_end=ended[0].set)) == [0, 1]
    with pytest.raises(ValueError, match="in the middle"):
        list(FreshThreadStream(failing_start, on_end=ended[1].set))
    with pytest.raises(ValueError, match="bad image"):
        FreshThreadStream(broken_start, on_end=ended[2].set)
    assert all(event.wait(5) for event in ended)
