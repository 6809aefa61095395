"""Torch work from request threads runs on a new thread that ends with it.

Why: libgomp gives each thread that runs a parallel region its own OpenMP team and keeps it until
that thread exits. Once the live teams hold more threads than there are CPUs, libgomp cuts every
team's spin-wait to 100 iterations, so a decode step's many small parallel ops sleep and wake on
futexes. Measured here: one torch op in a lasting handler thread took the engine's bf16 decode
from 22 to 13 tok/s until that thread exited. The engine thread is the one lasting torch thread;
request handlers (anyio's pool, the beam jobs) send their torch work through these helpers.
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
    the caller's thread. Items are produced ahead of the reader; `close()` stops the producer after
    the item it is making and waits for it, so the model is free once close returns.
    """

    def __init__(self, start: Callable[[], Iterator[T]], name: str = "torch-stream"):
        self._items: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self._ready: queue.Queue = queue.Queue(maxsize=1)
        self._finished = False
        self._thread = threading.Thread(target=self._produce, args=(start,), name=name, daemon=True)
        self._thread.start()
        problem = self._ready.get()
        if problem is not None:
            self._finished = True
            self._thread.join()
            raise problem.error

    def _produce(self, start: Callable[[], Iterator[T]]) -> None:
        try:
            source = start()
        except BaseException as error:
            self._ready.put(_Raised(error))
            return
        self._ready.put(None)
        try:
            for item in source:
                self._items.put(item)
                if self._closed.is_set():
                    break
        except BaseException as error:
            self._items.put(_Raised(error))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()  # on this thread: the source's own cleanup (e.g. cancelling) runs here
            self._items.put(_END)

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
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def __del__(self) -> None:
        self._closed.set()  # no join: a finalizer may run on any thread
