"""The batching engine of whatever model a holder has now (made on first use, closed on a switch), and
the count of work on a model that no engine counts."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import replace

from backend.contracts import ModelSource
from backend.decode.engine import Engine, EngineLimits
from backend.errors import ModelNotReady
from backend.models.packed_weights import ROW_KERNELS, adopt_row_kernels
from backend.models.row_kernels import RowKernels

log = logging.getLogger(__name__)

MODEL_SWITCHED = "The model was switched; please resend your message."


def kv_budget_text(limits: EngineLimits, context_window: int) -> str:
    """What the engine admits by, as vLLM says it: KV tokens, and how many full-context requests fit."""
    if limits.kv_tokens is None:
        return f"KV cache: no budget planned; at most {limits.max_batch_size} requests at once"
    return (
        f"KV cache: {limits.kv_tokens:,} tokens; maximum concurrency for {context_window:,} tokens per "
        f"request: {limits.kv_tokens / context_window:.2f}x (at most {limits.max_batch_size} at once)"
    )


def adopt_kernels(loaded, kernels: RowKernels, engine: Engine | None = None) -> None:
    """Move a loaded model packed for oneDNN to the row kernels, and say so where the System tab reads it and
    in the log (with `engine`'s decode step now: the line written when the engine started is out of date)."""
    if loaded.awaiting_kernels is None:  # already moved (a second engine on the same model)
        return
    moved = adopt_row_kernels(loaded.model, kernels)
    loaded.awaiting_kernels = None
    if moved:
        loaded.kernels = f"{ROW_KERNELS} on packed weights: on ({moved} linear layers, moved from oneDNN)"
    now = f"; decode step: {engine.decode_path}" if engine is not None else ""
    log.info("%s: %d linear layers moved to the row kernels%s", loaded.spec.name, moved, now)


class ModelEngine:
    def __init__(self, holder: ModelSource, limits: EngineLimits):
        self.holder = holder
        self.limits = limits
        self._engine: Engine | None = None
        self._lock = threading.Lock()

    def get(self, loaded, model) -> Engine:
        """The engine decoding `model` (part of `loaded`, the holder's current model)."""
        with self._lock:
            if self.holder.get() is not loaded:  # switched since this request began: never revive the old
                raise ModelNotReady(MODEL_SWITCHED)
            if self._engine is None or self._engine.model is not model:
                if self._engine is not None:
                    self._engine.close(MODEL_SWITCHED)
                limits = replace(self.limits, kv_tokens=loaded.plan.kv_cache_tokens)
                log.info("%s: %s", self.holder.loaded_name, kv_budget_text(limits, loaded.context_window))
                # A vision model's own generation_config names its end tokens, also when its LM decodes.
                self._engine = Engine(model, loaded.tokenizer, limits, eos_model=loaded.model)
                log.info("%s: decode step: %s", self.holder.loaded_name, self._engine.decode_path)
                # Loaded while the row kernels built: its layers move to them between replies once built.
                build = getattr(loaded, "awaiting_kernels", None)
                if build is not None:
                    engine = self._engine
                    build.when_ready(
                        lambda kernels: engine.between_replies(lambda: adopt_kernels(loaded, kernels, engine))
                    )
            return self._engine

    def queue_stats(self) -> tuple[int, int]:
        """(requests decoding, requests waiting) of the engine now; none before the first request."""
        engine = self._engine
        return engine.stats() if engine is not None else (0, 0)

    def kv_usage(self) -> tuple[int, int | None] | None:
        """(KV tokens reserved, the budget) of the engine now; None before the first request made one."""
        engine = self._engine
        return engine.kv_usage() if engine is not None else None

    def decode_path(self) -> str | None:
        """Which decode step the engine runs now; None before the first request made one."""
        engine = self._engine
        return engine.decode_path if engine is not None else None

    def pending(self) -> int:
        """Requests the model has not finished yet (a model switch waits for them)."""
        engine = self._engine
        return engine.pending() if engine is not None else 0

    def release(self, reason: str) -> None:
        """Let go of the model before a switch: requests still in the engine fail with `reason`."""
        with self._lock:
            if self._engine is not None:
                self._engine.close(reason)
            self._engine = None


class RequestCounter:
    """Counts work still running on a model that no engine counts (a switch waits for it)."""

    def __init__(self):
        self._count = 0
        self._lock = threading.Lock()

    def __call__(self) -> int:
        return self._count

    def started(self) -> Callable[[], None]:
        """Count one more; call what this returns when that work has stopped (more calls do nothing)."""
        with self._lock:
            self._count += 1
        pending = [True]

        def done() -> None:
            with self._lock:
                if pending:
                    pending.clear()
                    self._count -= 1

        return done
