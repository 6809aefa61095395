"""Reading several reply streams at once, as several users would, and watching an engine without a clock.

Nothing here measures time: tests order their steps by events (a held forward pass, a plugged engine,
an engine thread that has ended) and then assert on counts and state. Every timeout is HANG, a guard
against a hang that fails the test, never an expectation of how fast something runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager

import pytest

HANG = 60.0  # seconds; only ever a guard against a hang


def last_items_together(streams: list[Iterable], seconds: float = HANG) -> list:
    """Drain every stream on a thread of its own, all at once; the last item of each, in order."""
    results: list = [None] * len(streams)

    def drain(index: int) -> None:
        for item in streams[index]:
            results[index] = item

    threads = [threading.Thread(target=drain, args=(i,), daemon=True) for i in range(len(streams))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds)
    stuck = [index for index, thread in enumerate(threads) if thread.is_alive()]
    assert not stuck, f"streams {stuck} never ended"
    return results


def no_early_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """No end-of-sequence token: a reply runs to its max_new_tokens unless a stop word or a cancel ends it."""
    monkeypatch.setattr("backend.decode.generation.eos_token_ids", lambda model, tokenizer: set())


class Forwards:
    """Stands in for `model.forward` (install with monkeypatch.setattr(model, "forward", forwards)).

    Records every call: its thread, and whether it is a prefill (a prompt: more than one position) or a
    decode step (one position per row). For the engine thread's decode steps it also records how many
    requests were decoding, from `stats` (an engine's public stats()) where given, else the batch's rows.
    The engine's `hold_at`-th decode step waits, before it runs, until the test sets `go_on` (`held` is set
    once it waits there): a test can act while the engine is provably in the middle of a reply.
    """

    ENGINE = "engine"  # the name of the engine's thread

    def __init__(self, model, hold_at: int | None = None, stats: Callable[[], tuple[int, int]] | None = None):
        self.original = model.forward
        self.hold_at = hold_at
        self.stats = stats
        self.held = threading.Event()
        self.go_on = threading.Event()
        self._records: list[tuple[str, bool, int]] = []  # (thread, is a decode step, rows)
        self._lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        batch = kwargs.get("input_ids")
        if batch is None:
            batch = kwargs.get("inputs_embeds", args[0] if args else None)
        name = threading.current_thread().name
        step = batch.shape[1] == 1
        rows = self.stats()[0] if self.stats is not None and name == self.ENGINE else int(batch.shape[0])
        with self._lock:
            self._records.append((name, step, rows))
            number = len(self._steps())
        if step and name == self.ENGINE and number == self.hold_at:
            self.held.set()
            if not self.go_on.wait(HANG):
                raise AssertionError("the held decode step was never let go on")
        return self.original(*args, **kwargs)

    def _steps(self) -> list[int]:
        return [rows for name, step, rows in self._records if step and name == self.ENGINE]

    def steps(self) -> list[int]:
        """The engine's decode steps so far: how many requests each decoded."""
        with self._lock:
            return self._steps()

    def calls(self, thread: str = ENGINE) -> int:
        """Forward passes of any kind made on threads named `thread`."""
        with self._lock:
            return sum(1 for name, _, _ in self._records if name == thread)

    def wait_held(self) -> None:
        assert self.held.wait(HANG), f"the engine never reached decode step {self.hold_at}"


@pytest.fixture
def watch_forwards(monkeypatch: pytest.MonkeyPatch):
    """`watch_forwards(model, **options)` puts a Forwards in place of model.forward and returns it.

    At teardown every hold is let go, before the engines of earlier fixtures close: a test that fails
    while the engine is held fails at once instead of waiting out HANG in the engine's close.
    """
    made: list[Forwards] = []

    def install(model, **options) -> Forwards:
        forwards = Forwards(model, **options)
        monkeypatch.setattr(model, "forward", forwards)
        made.append(forwards)
        return forwards

    yield install
    for forwards in made:
        forwards.go_on.set()


@contextmanager
def plugged(engine, prompt_ids: list[int]):
    """Hold the engine thread in a prefill of its own (one that never calls the model) while the body
    submits: everything submitted meanwhile waits, and is admitted together once the plug is pulled,
    however slowly the body ran. The plug's request then fails, as a failed prefill does."""
    from backend.settings import GenerationSettings

    entered, pulled = threading.Event(), threading.Event()

    def prefill():
        entered.set()
        if not pulled.wait(HANG):
            raise AssertionError("the plug was never pulled")
        raise RuntimeError("plug pulled")

    handle = engine.submit(prompt_ids, GenerationSettings(seed=0, max_new_tokens=1), prefill=prefill)
    assert entered.wait(HANG), "the engine never started the plug"
    try:
        yield
    finally:
        pulled.set()
    with pytest.raises(RuntimeError, match="plug pulled"):
        list(handle)


def wait_until_idle(engine) -> None:
    """Return once the engine thread has ended. It ends only with nothing decoding or waiting (after
    limits.idle_seconds without work), so from here on no forward pass runs until the next submit."""
    while (thread := engine._thread) is not None:
        thread.join(HANG)
        assert not thread.is_alive(), "the engine thread never went idle"
        if engine._thread is thread:  # a closed engine's thread ends without clearing it
            break
    assert engine.pending() == 0


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` (for state with no event to wait on) until it holds; HANG is the hang guard."""
    deadline = time.monotonic() + HANG
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.005)
