"""Beam searches beside the batch: generate() cannot join our batch, so each runs as a job of its own."""

from __future__ import annotations

import logging
import threading

from backend.decode.generation import generate_beam
from backend.decode.requests import DONE, EngineLimits, Queue, RequestHandle
from backend.errors import ModelNotReady, ServerBusy
from backend.models.adapters import rows_using
from backend.settings import GenerationSettings

log = logging.getLogger(__name__)


class BeamJobs:
    """At most `limits.beam_workers` searches at once, `limits.max_queue` more waiting for a turn."""

    def __init__(self, model, tokenizer, limits: EngineLimits, queue: Queue):
        self.model, self.tokenizer, self.limits, self._queue = model, tokenizer, limits, queue
        self._turns = threading.Semaphore(limits.beam_workers)
        self._slots = threading.BoundedSemaphore(limits.beam_workers + limits.max_queue)
        self._lock = threading.Lock()
        self._jobs = 0  # queued or running
        self._closed: str | None = None  # why no more searches run

    def submit(self, prompt_ids: list[int], settings: GenerationSettings) -> RequestHandle:
        if self._closed is not None:
            raise ModelNotReady(self._closed)
        if not self._slots.acquire(blocking=False):
            raise ServerBusy("Too many beam searches are waiting. Try again in a moment.")
        handle = RequestHandle(self._queue)
        with self._lock:
            self._jobs += 1
        # A thread per job, not a pool: a lasting thread would keep an OpenMP team (backend.torch_threads).
        threading.Thread(
            target=self._run, args=(handle, prompt_ids, settings), name="beam", daemon=True
        ).start()
        return handle

    def count(self) -> int:
        """Searches queued or running."""
        with self._lock:
            return self._jobs

    def close(self, reason: str) -> None:
        """Searches still waiting for a turn, and later ones, fail with ModelNotReady(reason)."""
        self._closed = reason

    def _run(self, handle: RequestHandle, prompt_ids: list[int], settings: GenerationSettings) -> None:
        turn = False
        try:
            # Waiting for a turn, a cancelled search gives its queue place back at once.
            while not handle.cancelled.is_set() and self._closed is None:
                turn = self._turns.acquire(timeout=self.limits.poll_seconds)
                if turn:
                    break
            if handle.cancelled.is_set():
                handle.put(DONE)
            elif self._closed is not None:
                handle.put(ModelNotReady(self._closed))
            else:
                handle.started.set()
                with rows_using([settings.adapter]):
                    handle.put(generate_beam(self.model, self.tokenizer, prompt_ids, settings))
        except Exception as error:
            log.exception("Beam search failed")
            handle.put(error)
        finally:
            if turn:
                self._turns.release()
            self._slots.release()
            with self._lock:
                self._jobs -= 1
