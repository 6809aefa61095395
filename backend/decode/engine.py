"""The batching engine: requests that overlap in time share decode steps, each with its own settings.

Our own small scheduler, because transformers' continuous batching measured 48-56 tok/s for 8
requests here against 100-264 for one static batch, and has no per-request seed or stop strings;
a static batch cannot take a request that arrives while it runs. See benchmarks/README.md.

One thread owns the model while there is work (it ends when idle: see backend.torch_threads). Each
step it admits waiting requests in order while the batch has a free row and the KV budget has room for
a request's whole need (prompt + max_new_tokens, reserved up front: a reply never stops or is recomputed
halfway for lack of room); each newcomer is prefilled alone, then one decode step runs for the batch.

Seeds hold whatever else runs (batch-invariant by construction): every decode step has exactly
`max_batch_size` rows (padding fills the rest), every prompt is prefilled alone, each row attends over
its own keys only (backend.decode.batch_cache) and is sampled alone. So no tensor that a request's
numbers pass through has a shape that depends on its neighbours, whichever kernels the machine picks.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from backend.decode.batch_cache import BatchCache, RowKV, use_row_attention
from backend.decode.beam_jobs import BeamJobs
from backend.decode.fused_step import fused_decode_step
from backend.decode.generation import RequestState
from backend.decode.requests import DONE, EngineLimits, RequestHandle

__all__ = ["Engine", "EngineLimits", "RequestHandle"]
from backend.errors import ContextOverflow, ModelNotReady, ServerBusy, UserError
from backend.models.adapters import rows_using
from backend.models.loading import input_device
from backend.settings import GenerationSettings

log = logging.getLogger(__name__)

SHUTTING_DOWN = "The server is shutting down."


@dataclass
class _Pending:
    handle: RequestHandle
    prompt_ids: list[int]
    settings: GenerationSettings
    prefill: Callable[[], Any] | None = None

    @property
    def kv_need(self) -> int:
        return len(self.prompt_ids) + self.settings.max_new_tokens


@dataclass
class _Row:
    handle: RequestHandle
    state: RequestState
    kv: RowKV
    reserved: int  # KV tokens held for this request until it leaves


class Engine:
    """Owns `model` for decoding; thread-safe `submit` from any number of request threads."""

    def __init__(self, model, tokenizer, limits: EngineLimits | None = None, eos_model=None):
        self.model = model
        self.eos_model = eos_model if eos_model is not None else model  # whose generation_config ends replies
        self.tokenizer = tokenizer
        self.limits = limits or EngineLimits()
        use_row_attention(model)
        # Whether a seed gives the same text alone and in a batch: by construction (see above), unless
        # LLM.int8 picks outlier columns across the whole batch.
        self.seed_holds = self.limits.batch_invariant and not has_batch_outliers(model)
        # Decode steps skip transformers' forward where the model allows (backend.decode.fused_step).
        self._fused, self._decode_path = (
            fused_decode_step(model)
            if self.limits.fused_decode
            else (None, "transformers' forward (--no-fused-decode)")
        )
        self._lock = threading.Condition()
        self._waiting: deque[_Pending] = deque()
        self._rows: list[_Row] = []
        self._admitting = 0
        self._kv_reserved = 0  # KV tokens held by running requests
        self._between: list[Callable[[], None]] = []  # tasks for the next moment no reply is decoding
        self._device = input_device(model)
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._beams = BeamJobs(model, tokenizer, self.limits, self)
        self._stopping = False
        self._closed_reason = SHUTTING_DOWN
        self._thread: threading.Thread | None = None  # started by the first request, ends when idle
        atexit.register(self.close)  # a daemon thread inside torch at interpreter exit aborts the process

    # ------------------------------------------------------------------ requests

    def submit(
        self, prompt_ids: list[int], settings: GenerationSettings, prefill: Callable[[], Any] | None = None
    ) -> RequestHandle:
        """Queue a sample/greedy request; raises ServerBusy when the queue is full.

        `settings` come validated, with a concrete seed. `prefill`, if given, replaces this request's first
        forward pass (a vision model reads the image there): it returns logits and a one-row DynamicCache.
        """
        if settings.seed < 0:
            raise ValueError("a concrete seed is needed: settings.request_settings draws it")
        pending = _Pending(RequestHandle(self), list(prompt_ids), settings, prefill)
        budget = self.limits.kv_tokens
        if budget is not None and pending.kv_need > budget:
            raise ContextOverflow(
                f"This request needs room for {pending.kv_need:,} tokens (prompt and max_new_tokens) but the "
                f"model's KV cache holds {budget:,}; lower max_new_tokens or shorten the prompt."
            )
        with self._lock:
            if self._stopping:
                raise ModelNotReady(self._closed_reason)
            if len(self._waiting) >= self.limits.max_queue:
                raise ServerBusy(
                    f"The server is busy ({len(self._rows)} replies running, {len(self._waiting)} waiting). "
                    "Try again in a moment."
                )
            self._waiting.append(pending)
            self._start_thread()
        return pending.handle

    def between_replies(self, task: Callable[[], None]) -> None:
        """Run `task` on the engine's thread at the next moment no reply is decoding, before any waiting
        request starts (e.g. moving the model to other kernels: no reply then mixes two). Under constant
        load that moment comes when the batch next empties; its errors are logged, never a request's."""
        with self._lock:
            if not self._stopping:
                self._between.append(task)
                self._start_thread()

    def _start_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
            self._thread.start()
        self._lock.notify()

    @property
    def decode_path(self) -> str:
        """Which decode step runs, in words (its kernels can change: backend.models.row_kernels)."""
        return self._fused.describe() if self._fused is not None else self._decode_path

    def submit_beam(self, prompt_ids: list[int], settings: GenerationSettings) -> RequestHandle:
        """Beam search runs as its own job beside the batch (backend.decode.beam_jobs)."""
        return self._beams.submit(prompt_ids, settings)

    def stats(self) -> tuple[int, int]:
        """(requests decoding, requests waiting)."""
        with self._lock:
            return len(self._rows) + self._admitting, len(self._waiting)

    def kv_usage(self) -> tuple[int, int | None]:
        """(KV tokens reserved by running requests, the budget or None when only rows limit the batch)."""
        return self._kv_reserved, self.limits.kv_tokens

    def pending(self) -> int:
        """Requests not yet finished by the model: decoding, waiting, and beam searches."""
        with self._lock:
            return len(self._rows) + self._admitting + len(self._waiting) + self._beams.count()

    def close(self, reason: str = SHUTTING_DOWN) -> None:
        """Stop; requests still running or waiting fail with ModelNotReady(reason), as do later ones."""
        with self._lock:
            if not self._stopping:
                self._stopping, self._closed_reason = True, reason
                self._beams.close(reason)
            thread = self._thread
            self._lock.notify()
        if thread is not None and threading.current_thread() is not thread:
            thread.join(timeout=60)
            if thread.is_alive():
                log.warning("The engine thread is still in a forward pass after 60 s; going on without it")
        atexit.unregister(self.close)

    def position(self, handle: RequestHandle) -> int:
        with self._lock:
            for index, pending in enumerate(self._waiting):
                if pending.handle is handle:
                    return index + 1
        return 0

    def withdraw(self, handle: RequestHandle) -> None:
        """A cancelled request leaves the queue now: it must not hold a place others are refused for."""
        with self._lock:
            for pending in self._waiting:
                if pending.handle is handle:
                    self._waiting.remove(pending)
                    handle.put(DONE)
                    break
            self._lock.notify()  # a running row leaves at the next step

    # ------------------------------------------------------------------ the engine thread

    def _next_admissions(self) -> list[_Pending]:
        """Waiting requests in order, while a row is free and the KV budget holds their whole need."""
        admitted, budget = [], self.limits.kv_tokens
        while self._waiting and len(self._rows) + len(admitted) < self.limits.max_batch_size:
            need = self._waiting[0].kv_need
            if budget is not None and self._kv_reserved + need > budget:
                break  # first come, first served: later requests wait behind it rather than jump
            admitted.append(self._waiting.popleft())
            self._kv_reserved += need
        return admitted

    def _more_admissions(self) -> list[_Pending]:
        with self._lock:
            admitted = [] if self._stopping else self._next_admissions()
            self._admitting = len(admitted)
            return admitted

    def _run(self) -> None:
        torch.set_grad_enabled(False)  # thread-local: this thread only ever runs inference
        while True:
            with self._lock:
                idle = not self._rows
                while not self._stopping and not self._waiting and not self._rows and not self._between:
                    if (
                        not self._lock.wait(self.limits.idle_seconds)
                        and not self._waiting
                        and not self._stopping
                        and not self._between
                    ):
                        self._thread = None  # ends, and its OpenMP team with it; the next submit starts one
                        return
                tasks, self._between = (self._between, []) if idle else ([], self._between)
            self._run_between(tasks)
            with self._lock:
                deadline = time.monotonic() + (self.limits.gather_seconds if idle else 0.0)
                while not self._stopping and len(self._waiting) < self.limits.max_batch_size:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._lock.wait(remaining)
                if self._stopping:
                    break
                admitted = self._next_admissions()
                self._admitting = len(admitted)  # counted as running while their prefill runs
            try:
                while admitted:
                    self._admit(admitted.pop(0))  # from here on the row (or its error) is the request's
                    self._admitting -= 1
                    if idle and not admitted:
                        # Users arrive in bursts: those that came during an idle engine's first prefills join
                        # before its first decode step, rather than one step later. (A 10 ms window before
                        # the first prefill did this before, and cost a lone user 10 ms to first token.)
                        admitted = self._more_admissions()
                self._drop_finished()
                if self._rows:
                    self._decode_step()
                    self._drop_finished()
            except Exception as error:  # a failed step fails its batch and its newcomers, never the engine
                self._admitting = 0
                log.exception("Decode step failed")
                for row in self._rows:
                    row.handle.put(error)
                self._release(self._rows)
                for pending in admitted:  # popped from the queue, their room reserved, never prefilled
                    self._kv_reserved -= pending.kv_need
                    pending.handle.put(error)
        with self._lock:
            left = [row.handle for row in self._rows] + [pending.handle for pending in self._waiting]
            self._release(self._rows)
            self._waiting.clear()
        for handle in left:
            handle.put(ModelNotReady(self._closed_reason))

    def _run_between(self, tasks: list[Callable[[], None]]) -> None:
        for task in tasks:
            try:
                task()
            except Exception:
                log.exception("A task between replies failed")

    @torch.inference_mode()
    def _admit(self, pending: _Pending) -> None:
        """Prefill one newcomer alone, emit its first token, and add it to the batch."""
        reserved = pending.kv_need
        try:
            if pending.handle.cancelled.is_set():
                raise _Withdrawn
            pending.handle.started.set()
            state = RequestState(self.eos_model, self.tokenizer, pending.prompt_ids, pending.settings)
            kv = RowKV(reserved)
            if pending.prefill is not None:
                outputs = pending.prefill()
                cached = outputs.past_key_values.get_seq_length()
                if cached != len(pending.prompt_ids):  # e.g. image features the prompt did not count
                    kv = RowKV(cached + pending.settings.max_new_tokens)
                    self._kv_reserved += kv.capacity - reserved
                    reserved = kv.capacity
                kv.load(outputs.past_key_values)
            else:
                cache = BatchCache([kv])
                with rows_using([pending.settings.adapter]):
                    outputs = self.model(
                        input_ids=torch.tensor([pending.prompt_ids], dtype=torch.long, device=self._device),
                        position_ids=torch.arange(len(pending.prompt_ids), device=self._device)[None],
                        past_key_values=cache,
                        batch_cache=cache,
                        use_cache=True,
                        logits_to_keep=1,
                    )
        except _Withdrawn:
            self._kv_reserved -= reserved
            pending.handle.put(DONE)
            return
        except Exception as error:  # e.g. a prompt the model cannot take: only this newcomer fails
            self._kv_reserved -= reserved
            if isinstance(error, UserError):  # expected: one line, not a traceback
                log.warning("Refused at its prefill (%s): %s", type(error).__name__, error)
            else:
                log.exception("Prefill failed")
            pending.handle.put(error)
            return
        row = _Row(pending.handle, state, kv, reserved)
        self._rows.append(row)
        self._emit(row, outputs.logits[0, -1])

    @torch.inference_mode()
    def _decode_step(self) -> None:
        """One token for every row, in a batch of exactly max_batch_size rows (see the module docstring)."""
        rows = len(self._rows)
        width = max(self.limits.max_batch_size, rows) if self.limits.batch_invariant else rows
        ids = torch.full((width, 1), self._pad, dtype=torch.long)
        positions = torch.zeros((width, 1), dtype=torch.long)
        for index, row in enumerate(self._rows):
            ids[index, 0], positions[index, 0] = row.state.last_token, row.kv.length
        kvs = [row.kv for row in self._rows]
        if self._fused is not None and self._fused.still_applies():
            logits = self._fused(ids.to(self._device), positions.to(self._device), kvs)
        else:
            cache = BatchCache(kvs)
            adapters = [row.state.settings.adapter for row in self._rows]
            with rows_using(adapters + [""] * (width - len(adapters))):
                outputs = self.model(
                    input_ids=ids.to(self._device),
                    position_ids=positions.to(self._device),
                    past_key_values=cache,
                    batch_cache=cache,
                    use_cache=True,
                )
            logits = outputs.logits[:, -1]
        for index, row in enumerate(self._rows):
            self._emit(row, logits[index])

    def _emit(self, row: _Row, logits: torch.Tensor) -> None:
        """The row's next token, sampled from its own logits [vocab] alone (never stacked with others')."""
        if not row.handle.cancelled.is_set():
            row.handle.put(row.state.step(logits))

    def _drop_finished(self) -> None:
        """Rows that finished or were cancelled leave, and give back their KV reservation."""
        leaving = [row for row in self._rows if row.state.finished or row.handle.cancelled.is_set()]
        for row in leaving:
            if row.handle.cancelled.is_set() and not row.state.finished:
                row.handle.put(DONE)
        self._release(leaving)

    def _release(self, rows: list[_Row]) -> None:
        for row in list(rows):
            self._rows.remove(row)
            self._kv_reserved -= row.reserved


def has_batch_outliers(model) -> bool:
    """LLM.int8 layers (bitsandbytes) with an outlier threshold: they pick outlier columns batch-wide."""
    return any(
        type(module).__name__ == "Linear8bitLt"
        and getattr(getattr(module, "state", None), "threshold", 0) > 0
        for module in model.modules()
    )


class _Withdrawn(Exception):
    """A request cancelled before its prefill."""
