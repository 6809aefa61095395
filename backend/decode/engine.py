"""The batching engine: requests that overlap in time share forward passes, each with its own settings.

Our own small scheduler, because transformers' continuous batching measured 48-56 tok/s for 8
requests here against 100-264 for one static batch, and has no per-request seed or stop strings;
a static batch cannot take a request that arrives while it runs. See benchmarks/README.md.

One thread owns the model while there is work (it ends when idle: see backend.torch_threads). Each
step it admits waiting requests (newcomers share one left-padded prefill; one with its own prefill,
an image's, runs alone), then runs one decode step for the whole batch: left-padded KV cache,
per-row attention mask and positions. Rows leave at the next step when they finish or are
cancelled, which frees their part of the cache. Beam searches run on threads of their own.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from backend.decode.generation import GenerationUpdate, RequestState, generate_beam
from backend.errors import ModelNotReady, ServerBusy
from backend.models.adapters import rows_using
from backend.models.loading import input_device
from backend.settings import GenerationSettings

log = logging.getLogger(__name__)

_DONE = object()
SHUTTING_DOWN = "The server is shutting down."


@dataclass(frozen=True)
class EngineLimits:
    max_batch_size: int = 8  # sequences decoded together
    max_queue: int = 32  # requests waiting beyond the batch; more are told the server is busy
    beam_workers: int = 1  # beam searches run beside the batch, this many at a time
    poll_seconds: float = 0.5  # how often a waiting request hears its queue position
    gather_seconds: float = 0.01  # an idle engine waits this long for more arrivals before a prefill
    idle_seconds: float = 2.0  # the engine thread ends after this long without work (see torch_threads)


class RequestHandle:
    """What `submit` returns: iterate it for updates; closing it (or `cancel`) ends the request."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self._updates: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.started = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()
        self._engine._withdraw(self)

    def position(self) -> int:
        """1 for the next to start; 0 once it runs."""
        return 0 if self.started.is_set() else self._engine._position(self)

    def __iter__(self) -> Iterator[GenerationUpdate]:
        try:
            while True:
                try:
                    item = self._updates.get(timeout=self._engine.limits.poll_seconds)
                except queue.Empty:
                    if not self.started.is_set():
                        yield GenerationUpdate("", 0, queue_position=self.position())
                    continue
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            self.cancel()  # a consumer that stops listening (Stop, closed tab) frees the slot

    def _put(self, item) -> None:
        self._updates.put(item)


@dataclass
class _Pending:
    handle: RequestHandle
    prompt_ids: list[int]
    settings: GenerationSettings
    prefill: Callable[[], Any] | None = None


@dataclass
class _Row:
    handle: RequestHandle
    state: RequestState
    length: int  # real tokens in this row's cache (prompt + generated)


class Engine:
    """Owns `model` for decoding; thread-safe `submit` from any number of request threads."""

    def __init__(self, model, tokenizer, limits: EngineLimits | None = None, eos_model=None):
        self.model = model
        self.eos_model = eos_model if eos_model is not None else model  # whose generation_config ends replies
        self.tokenizer = tokenizer
        self.limits = limits or EngineLimits()
        self._lock = threading.Condition()
        self._waiting: deque[_Pending] = deque()
        self._rows: list[_Row] = []
        self._admitting = 0
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, cache length], 0 where left padding
        self._device = input_device(model)
        self._beam_turns = threading.Semaphore(self.limits.beam_workers)  # beam searches running at once
        self._beam_slots = threading.BoundedSemaphore(self.limits.beam_workers + self.limits.max_queue)
        self._stopping = False
        self._closed_reason = SHUTTING_DOWN
        self._beam_jobs = 0  # queued or running
        self._thread: threading.Thread | None = None  # started by the first request, ends when idle
        atexit.register(self.close)  # a daemon thread inside torch at interpreter exit aborts the process

    # ------------------------------------------------------------------ requests

    def submit(
        self, prompt_ids: list[int], settings: GenerationSettings, prefill: Callable[[], Any] | None = None
    ) -> RequestHandle:
        """Queue a sample/greedy request; raises ServerBusy when the queue is full.

        `prefill`, if given, replaces this request's first forward pass (a vision model reads the
        image there): it returns logits and a DynamicCache of one row, then the row joins the batch.
        """
        handle = RequestHandle(self)
        with self._lock:
            if self._stopping:
                raise ModelNotReady(self._closed_reason)
            if len(self._waiting) >= self.limits.max_queue:
                raise ServerBusy(
                    f"The server is busy ({len(self._rows)} replies running, {len(self._waiting)} waiting). "
                    "Try again in a moment."
                )
            self._waiting.append(_Pending(handle, list(prompt_ids), settings.with_seed(), prefill))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
                self._thread.start()
            self._lock.notify()
        return handle

    def submit_beam(self, prompt_ids: list[int], settings: GenerationSettings) -> RequestHandle:
        """Beam search runs as its own job beside the batch (generate() cannot join our batch)."""
        if self._stopping:
            raise ModelNotReady(self._closed_reason)
        if not self._beam_slots.acquire(blocking=False):
            raise ServerBusy("Too many beam searches are waiting. Try again in a moment.")
        handle = RequestHandle(self)
        with self._lock:
            self._beam_jobs += 1

        def job():
            turn = False
            try:
                # Waiting for a turn, a cancelled search gives its queue place back at once.
                while not handle.cancelled.is_set() and not self._stopping:
                    turn = self._beam_turns.acquire(timeout=self.limits.poll_seconds)
                    if turn:
                        break
                if handle.cancelled.is_set():
                    handle._put(_DONE)
                    return
                if self._stopping:
                    handle._put(ModelNotReady(self._closed_reason))
                    return
                handle.started.set()
                with rows_using([settings.adapter]):
                    handle._put(generate_beam(self.model, self.tokenizer, prompt_ids, settings))
            except Exception as error:
                log.exception("Beam search failed")
                handle._put(error)
            finally:
                if turn:
                    self._beam_turns.release()
                self._beam_slots.release()
                with self._lock:
                    self._beam_jobs -= 1

        # A thread per job, not a pool: a lasting thread would keep an OpenMP team (backend.torch_threads).
        threading.Thread(target=job, name="beam", daemon=True).start()
        return handle

    def stats(self) -> tuple[int, int]:
        """(requests decoding, requests waiting)."""
        with self._lock:
            return len(self._rows) + self._admitting, len(self._waiting)

    def pending(self) -> int:
        """Requests not yet finished by the model: decoding, waiting, and beam searches."""
        with self._lock:
            return len(self._rows) + self._admitting + len(self._waiting) + self._beam_jobs

    def close(self, reason: str = SHUTTING_DOWN) -> None:
        """Stop; requests still running or waiting fail with ModelNotReady(reason), as do later ones."""
        with self._lock:
            if not self._stopping:
                self._stopping, self._closed_reason = True, reason
            thread = self._thread
            self._lock.notify()
        if thread is not None and threading.current_thread() is not thread:
            thread.join(timeout=60)
            if thread.is_alive():
                log.warning("The engine thread is still in a forward pass after 60 s; going on without it")
        atexit.unregister(self.close)

    def _position(self, handle: RequestHandle) -> int:
        with self._lock:
            for index, pending in enumerate(self._waiting):
                if pending.handle is handle:
                    return index + 1
        return 0

    def _withdraw(self, handle: RequestHandle) -> None:
        """A cancelled request leaves the queue now: it must not hold a place others are refused for."""
        with self._lock:
            for pending in self._waiting:
                if pending.handle is handle:
                    self._waiting.remove(pending)
                    handle._put(_DONE)
                    break
            self._lock.notify()  # a running row leaves at the next step

    # ------------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        torch.set_grad_enabled(False)  # thread-local: this thread only ever runs inference
        while True:
            with self._lock:
                idle = not self._rows
                while not self._stopping and not self._waiting and not self._rows:
                    if (
                        not self._lock.wait(self.limits.idle_seconds)
                        and not self._waiting
                        and not self._stopping
                    ):
                        self._thread = None  # ends, and its OpenMP team with it; the next submit starts one
                        return
                # Users arrive in bursts; a moment's wait lets a burst share one prefill.
                deadline = time.monotonic() + (self.limits.gather_seconds if idle else 0.0)
                while not self._stopping and len(self._waiting) < self.limits.max_batch_size:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._lock.wait(remaining)
                if self._stopping:
                    break
                admitted = []
                while self._waiting and len(self._rows) + len(admitted) < self.limits.max_batch_size:
                    admitted.append(self._waiting.popleft())
                self._admitting = len(admitted)  # counted as running while their prefill runs
            try:
                if admitted:
                    self._admit(admitted)
                self._admitting = 0
                self._drop_finished()
                if self._rows:
                    self._decode_step()
                    self._drop_finished()
            except Exception as error:  # a failed step fails its batch and its newcomers, never the engine
                self._admitting = 0
                log.exception("Decode step failed")
                joined = {id(row.handle) for row in self._rows}
                for handle in [row.handle for row in self._rows] + [
                    pending.handle for pending in admitted if id(pending.handle) not in joined
                ]:
                    handle._put(error)
                self._rows, self._cache, self._mask = [], None, None
        with self._lock:
            left = [row.handle for row in self._rows] + [pending.handle for pending in self._waiting]
            self._rows, self._cache, self._mask = [], None, None
            self._waiting.clear()
        for handle in left:
            handle._put(ModelNotReady(self._closed_reason))

    @torch.inference_mode()
    def _admit(self, admitted: list[_Pending]) -> None:
        """Prefill the newcomers together (left-padded), emit their first tokens, join the batch."""
        group: list[tuple[_Pending, RequestState]] = []
        for pending in admitted:
            if pending.handle.cancelled.is_set():
                pending.handle._put(_DONE)
                continue
            pending.handle.started.set()
            try:
                state = RequestState(self.eos_model, self.tokenizer, pending.prompt_ids, pending.settings)
            except Exception as error:
                pending.handle._put(error)
                continue
            if pending.prefill is not None:
                self._admit_prefilled(pending, state)
            else:
                group.append((pending, state))
        if not group:
            return
        width = max(len(pending.prompt_ids) for pending, _ in group)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        padded = [[pad] * (width - len(p.prompt_ids)) + p.prompt_ids for p, _ in group]
        ids = torch.tensor(padded, dtype=torch.long, device=self._device)
        mask = torch.tensor(
            [[0] * (width - len(p.prompt_ids)) + [1] * len(p.prompt_ids) for p, _ in group],
            device=self._device,
        )
        try:
            with rows_using([pending.settings.adapter for pending, _ in group]):
                outputs = self.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0),
                    # Full layers only: a sliding-window layer keeps fewer positions than the shared mask
                    # and our padding assume; the model's mask still applies the window.
                    past_key_values=DynamicCache(),
                    use_cache=True,
                    logits_to_keep=1,
                )
        except Exception as error:  # e.g. a prompt the model cannot take: only the newcomers fail
            log.exception("Prefill failed")
            for pending, _ in group:
                pending.handle._put(error)
            return
        rows = [_Row(pending.handle, state, len(pending.prompt_ids)) for pending, state in group]
        self._emit(rows, outputs.logits[:, -1, :])
        self._join(rows, outputs.past_key_values, mask)

    def _admit_prefilled(self, pending: _Pending, state: RequestState) -> None:
        """A request with its own first forward pass (e.g. an image's): alone, then it joins the batch."""
        try:
            outputs = pending.prefill()
        except Exception as error:
            log.exception("Prefill failed")
            pending.handle._put(error)
            return
        length = outputs.past_key_values.get_seq_length()
        row = _Row(pending.handle, state, length)
        self._emit([row], outputs.logits[:, -1, :])
        mask = torch.ones((1, length), dtype=torch.long, device=self._device)
        self._join([row], outputs.past_key_values, mask)

    def _join(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Left-pad the shorter of (batch, newcomers) so both end at the same position, then stack."""
        if self._cache is None:
            self._rows, self._cache, self._mask = rows, cache, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])
        self._cache = _stack_caches(_pad_cache(self._cache, width), _pad_cache(cache, width))
        self._mask = torch.cat([_pad_mask(self._mask, width), _pad_mask(mask, width)], dim=0)
        self._rows.extend(rows)

    def _emit(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Each live row's next token; warpers run once per group of rows with equal settings."""
        groups: dict[object, list[int]] = {}
        for index, row in enumerate(rows):
            if not row.handle.cancelled.is_set():
                key = row.state.warper_key
                groups.setdefault(key if key is not None else ("own", index), []).append(index)
        for indices in groups.values():
            scores = rows[indices[0]].state.process(logits[indices])
            for position, index in enumerate(indices):
                rows[index].handle._put(rows[index].state.advance(scores[position]))

    @torch.inference_mode()
    def _decode_step(self) -> None:
        last = torch.tensor(
            [[row.state.last_token] for row in self._rows], dtype=torch.long, device=self._device
        )
        positions = torch.tensor([[row.length] for row in self._rows], dtype=torch.long, device=self._device)
        self._mask = torch.cat([self._mask, torch.ones_like(last)], dim=1)
        with rows_using([row.state.settings.adapter for row in self._rows]):
            outputs = self.model(
                input_ids=last,
                attention_mask=self._mask,
                position_ids=positions,
                past_key_values=self._cache,
                use_cache=True,
            )
        self._cache = outputs.past_key_values
        for row in self._rows:
            row.length += 1
        self._emit(self._rows, outputs.logits[:, -1, :])

    def _drop_finished(self) -> None:
        """Rows that finished or were cancelled leave; their cache rows and common padding go."""
        keep = [
            i
            for i, row in enumerate(self._rows)
            if not row.state.finished and not row.handle.cancelled.is_set()
        ]
        if len(keep) == len(self._rows):
            return
        for index, row in enumerate(self._rows):
            if index not in keep and row.handle.cancelled.is_set() and not row.state.finished:
                row.handle._put(_DONE)
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        indices = torch.tensor(keep, device=self._device)
        self._rows = [self._rows[i] for i in keep]
        self._mask = self._mask.index_select(0, indices)
        for layer in self._cache.layers:
            layer.batch_select_indices(indices)
        unused = int((self._mask.sum(dim=0) == 0).long().cumprod(dim=0).sum())  # all-padding columns at left
        if unused:
            self._mask = self._mask[:, unused:]
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[..., unused:, :], layer.values[..., unused:, :]


def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(mask, (width - mask.shape[1], 0))


def _pad_cache(cache: DynamicCache, width: int) -> DynamicCache:
    """Left-pad every layer's keys and values (shape [batch, heads, seq, dim]) to `width` positions."""
    for layer in cache.layers:
        extra = width - layer.keys.shape[-2]
        if extra > 0:
            layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, extra, 0))
            layer.values = torch.nn.functional.pad(layer.values, (0, 0, extra, 0))
    return cache


def _stack_caches(batch: DynamicCache, newcomer: DynamicCache) -> DynamicCache:
    for mine, theirs in zip(batch.layers, newcomer.layers, strict=True):
        mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
        mine.values = torch.cat([mine.values, theirs.values], dim=0)
    return batch
