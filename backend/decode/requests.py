"""What a request to the engine is: the limits it is admitted under, and the handle its caller holds."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from backend.decode.generation import GenerationUpdate

DONE = object()  # put on a handle when its request ends without an update of its own (cancelled)


@dataclass(frozen=True)
class EngineLimits:
    max_batch_size: int = 8  # sequences decoded together; every decode step has this many rows
    max_queue: int = 32  # requests waiting beyond the batch; more are told the server is busy
    kv_tokens: int | None = None  # the KV budget requests are admitted by (the plan's pool); None: rows only
    batch_invariant: bool = True  # pad every decode step to max_batch_size rows, so seeds hold under load
    fused_decode: bool = True  # decode steps skip transformers' forward where they can (decode.fused_step)
    beam_workers: int = 1  # beam searches run beside the batch, this many at a time
    poll_seconds: float = 0.5  # how often a waiting request hears its queue position
    gather_seconds: float = 0.0  # an idle engine waits this long for more arrivals before admitting (below)
    idle_seconds: float = 2.0  # the engine thread ends after this long without work (see torch_threads)


class Queue(Protocol):
    """What a handle asks of the engine that queued it."""

    limits: EngineLimits

    def position(self, handle: RequestHandle) -> int: ...

    def withdraw(self, handle: RequestHandle) -> None: ...


class RequestHandle:
    """What `submit` returns: iterate it for updates; closing it (or `cancel`) ends the request."""

    def __init__(self, engine: Queue):
        self._engine = engine
        self._updates: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.started = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()
        self._engine.withdraw(self)

    def position(self) -> int:
        """1 for the next to start; 0 once it runs."""
        return 0 if self.started.is_set() else self._engine.position(self)

    def __iter__(self) -> Iterator[GenerationUpdate]:
        try:
            while True:
                try:
                    item = self._updates.get(timeout=self._engine.limits.poll_seconds)
                except queue.Empty:
                    if not self.started.is_set():
                        yield GenerationUpdate("", 0, queue_position=self.position())
                    continue
                if item is DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            self.cancel()  # a consumer that stops listening (Stop, closed tab) frees the slot

    def put(self, item) -> None:
        """From the engine: an update, DONE, or the error the request failed with."""
        self._updates.put(item)
