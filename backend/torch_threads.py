"""Torch work from request threads runs on a new thread that ends with it.

Why: libgomp gives each thread that runs a parallel region its own OpenMP team and keeps it until
that thread exits. Once the live teams hold more threads than there are CPUs, libgomp cuts every
team's spin-wait to 100 iterations, so a decode step's many small parallel ops sleep and wake on
futexes. Measured here: one torch op in a lasting handler thread took the engine's bf16 decode
from 22 to 13 tok/s until that thread exited. So no thread keeps torch work for longer than it
has some: engine threads end when idle, and request handlers (anyio's lasting pool) send their
torch work through these helpers. Two jobs at once still hold two teams, but only while both run.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
_END = object()


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


def call_on_fresh_thread(
    function: Callable[..., T], *args: Any, name: str = "torch-call", **kwargs: Any
) -> T:
    """`function(*args, **kwargs)` on a new thread; its result or exception comes back here."""
    outcome: list = []

    def run():
        try:
            outcome.append(function(*args, **kwargs))
        except BaseException as error:  # re-raised in the caller's thread
            outcome.append(_Raised(error))

    worker = threading.Thread(target=run, name=name, daemon=True)
    worker.start()
    worker.join()
    if isinstance(outcome[0], _Raised):
        raise outcome[0].error
    return outcome[0]


class FreshThreadStream(Iterator[T]):
    """Runs `start()` and iterates what it returns on one new thread, which ends with the stream.

    `start()`'s own errors (bad input found before the first item) raise from the constructor, in
    the caller's thread. Items are produced ahead of the reader. Closing (or dropping) the stream
    stops the producer after the item it is making, without waiting for it; `on_end` runs on the
    producer's thread once it has stopped, however it stopped, so a caller can count it as running
    on the model until then.
    """

    def __init__(
        self,
        start: Callable[[], Iterator[T]],
        name: str = "torch-stream",
        on_end: Callable[[], object] | None = None,
    ):
        self._items: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self._finished = False
        ready: queue.Queue = queue.Queue(maxsize=1)
        # The thread gets no reference to `self`, so a stream its reader drops is collected and closed.
        args = (start, ready, self._items, self._closed, on_end)
        threading.Thread(target=_produce, args=args, name=name, daemon=True).start()
        problem = ready.get()
        if problem is not None:
            self._finished = True
            raise problem.error

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        item = self._items.get()
        if item is _END:
            self._finished = True
            raise StopIteration
        if isinstance(item, _Raised):
            self._finished = True
            raise item.error
        return item

    def close(self) -> None:
        self._finished = True
        self._closed.set()

    def __del__(self) -> None:
        self._closed.set()


def _produce(start, ready: queue.Queue, items: queue.Queue, closed: threading.Event, on_end) -> None:
    try:
        try:
            source = start()
        except BaseException as error:
            ready.put(_Raised(error))
            return
        ready.put(None)
        try:
            for item in source:
                items.put(item)
                if closed.is_set():
                    break
        except BaseException as error:
            items.put(_Raised(error))
        finally:
            try:
                close = getattr(source, "close", None)
                if close is not None:
                    close()  # on this thread: the source's own cleanup (e.g. cancelling) runs here
            finally:
                items.put(_END)
    finally:
        if on_end is not None:
            on_end()
