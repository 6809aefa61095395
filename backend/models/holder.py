"""Loads the text model in the background and says how far it got, so the UI can start at once.

Falls back to the built-in demo model when the configured one cannot be loaded, and says why.
Switches to another model of the allowlist set at launch: waits for running requests (bounded),
refuses new ones meanwhile, unloads, re-plans and loads, with progress in `status()`.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import torch

from backend.errors import BadInput, ModelNotReady
from backend.model_status import LoadStatus, ModelInfo
from backend.models.demo_text import DEMO_TEXT_MODEL
from backend.models.hub import ModelUnavailable
from backend.models.loading import LoadedModel, ModelSpec, load_text_model, with_joint_plan
from backend.models.packed_weights import ROW_KERNELS
from backend.placement.plans import dtype_name

log = logging.getLogger(__name__)


class ModelHolder:
    """Owns one loaded model; `get()` from any thread, `status()` for progress.

    `loader` turns a spec into a loaded model (text by default; the vision loader for images)
    and `demo_name` names the built-in model that stands in when the spec cannot be loaded.
    """

    def __init__(
        self,
        spec: ModelSpec,
        fallback_to_demo: bool = True,
        loader: Callable[..., Any] = load_text_model,
        demo_name: str = DEMO_TEXT_MODEL,
        choices: Sequence[str] = (),
        drain_seconds: float = 60.0,
    ):
        self.spec = spec
        self.fallback_to_demo = fallback_to_demo
        self.loader = loader
        self.demo_name = demo_name
        self.choices = tuple(dict.fromkeys([spec.name, *choices]))  # what `switch` takes: set at launch
        self.drain_seconds = drain_seconds  # how long a switch waits for running requests
        # The spec of a model switched in, with its device plan; plan_switches_together plans it jointly.
        self.planner: Callable[[ModelSpec], ModelSpec] = lambda new: new
        self._status = LoadStatus("loading", "Waiting to start")
        self._loaded: LoadedModel | None = None
        self._thread: threading.Thread | None = None
        self._switching: str | None = None  # the model being switched to
        self._switch_lock = threading.Lock()
        self._users: list[tuple[Callable[[], int], Callable[[str], None]]] = []

    def start(self) -> None:
        self._thread = threading.Thread(target=self.load, name="model-loader", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> LoadStatus:
        if self._thread is not None:
            self._thread.join(timeout)
        return self._status

    def status(self) -> LoadStatus:
        return self._status

    @property
    def is_demo(self) -> bool:
        return self._loaded is not None and self._loaded.is_demo

    @property
    def loaded_name(self) -> str:
        """The model actually answering: the demo's name when it stands in."""
        return self._loaded.spec.name if self._loaded is not None else self.spec.name

    def info(self) -> ModelInfo:
        """What the UI shows of the model answering now (raises ModelNotReady while there is none)."""
        loaded = self.get()
        warnings = set(loaded.plan.warnings)  # the System tab shows those with the plan picture
        return ModelInfo(
            name=self.loaded_name,
            location=str(loaded.path),
            quantization=loaded.spec.quantization,
            dtype=dtype_name(loaded.dtype),
            context_window=loaded.context_window,
            load_seconds=loaded.load_seconds,
            places=tuple(sorted({str(device) for device in loaded.plan.device_map.values()})),
            notes=tuple(note for note in loaded.notes if note not in warnings),
            is_demo=loaded.is_demo,
            kernels=loaded.kernels
            + (f"; {awaiting.text()}" if (awaiting := loaded.awaiting_kernels) else ""),
        )

    def kernels_state(self) -> str | None:
        """For the banner (backend.models.row_kernels): "building" while the model serves on oneDNN until the
        row kernels are built, "ready" until it moves to them, "on" once it runs on them, None otherwise."""
        loaded = self._loaded
        if loaded is None or self._status.state != "ready":
            return None
        awaiting = loaded.awaiting_kernels
        if awaiting is not None:
            return "building" if awaiting.building else "ready"
        return "on" if loaded.kernels.startswith(ROW_KERNELS) else None

    def plan_report(self) -> dict | None:
        """The device plan and the memory in use now, for the System tab; None until a model is ready."""
        if self._status.state != "ready" or self._loaded is None:
            return None
        return self._loaded.system_report()

    def get(self) -> LoadedModel:
        switching = self._switching
        if switching is not None:
            raise ModelNotReady(f"Switching to {switching}… Try again in a moment.")
        if self._loaded is None:
            status = self._status
            if status.state == "failed":
                raise ModelNotReady(f"The model failed to load: {status.stage}")
            raise ModelNotReady(f"The model is still loading ({status.stage}). Try again in a moment.")
        return self._loaded

    def load(self) -> LoadStatus:
        """Load synchronously (the background thread runs this); never raises."""
        try:
            self._loaded = self.loader(self.spec, self._progress)
            self._status = LoadStatus("ready", f"Ready: {self.spec.name}")
        except Exception as error:  # any failure: a missing model must not stop the app starting
            if isinstance(error, ModelUnavailable):
                log.warning("%s", error)  # expected offline; a traceback would only alarm
            else:
                log.exception("Could not load %s", self.spec.name)
            reason = f"Could not load {self.spec.name}: {error}"
            if not self.fallback_to_demo or self.spec.name == self.demo_name:
                self._status = LoadStatus("failed", reason)
                return self._status
            self._load_demo(reason)
        return self._status

    def _load_demo(self, reason: str) -> None:
        demo_spec = replace(self.spec, name=self.demo_name, quantization="none", gpu_memory=None)
        try:
            self._loaded = self.loader(demo_spec, self._progress)
            self._status = LoadStatus("ready", "Ready: built-in demo model", fallback_reason=reason)
        except Exception as error:
            log.exception("Could not build the demo model either")
            self._status = LoadStatus("failed", f"{reason}; the demo model failed too: {error}")

    def _progress(self, stage: str, fraction: float | None) -> None:
        log.info("%s%s", stage, f" ({fraction:.0%})" if fraction is not None else "")
        if self._switching is not None:
            stage = f"Switching to {self._switching}: {stage}"
        self._status = LoadStatus("loading", stage, fraction)

    # ------------------------------------------------------------------ switching models

    def register_requests(self, running: Callable[[], int], release: Callable[[str], None]) -> None:
        """A service using the model: `running()` counts its unfinished requests; `release(reason)` drops
        what it holds of the model (an engine, caches), failing what is still running with `reason`."""
        self._users.append((running, release))

    def switch(self, name: str) -> None:
        """Start replacing the model with `name`, one of `choices`; status() shows the progress."""
        if name not in self.choices:
            raise BadInput(f"{name!r} is not one of the models offered here: {', '.join(self.choices)}.")
        with self._switch_lock:
            if self._switching is not None or self._status.state == "loading":
                raise ModelNotReady(f"Cannot switch now: {self._status.stage}. Try again when it is done.")
            ready = self._status.state == "ready" and self._status.fallback_reason is None
            if name == self.spec.name and ready:
                return
            self._switching = name
            self._status = LoadStatus("loading", f"Switching to {name}")
        self._thread = threading.Thread(target=self._switch, args=(name,), name="model-switch", daemon=True)
        self._thread.start()

    def _switch(self, name: str) -> None:
        previous = self.spec
        try:
            self._wait_for_requests(name)
            self._unload(f"The model was switched to {name}; please resend your message.")
            self._progress("planning devices", None)
            self.spec = self.planner(replace(previous, name=name, planned=None))
            self._loaded = self.loader(self.spec, self._progress)
            self._status = LoadStatus("ready", f"Ready: {name}")
        except Exception as error:  # go back to the model that worked, rather than serve none
            log.exception("Could not switch to %s", name)
            self.spec = previous
            self._switching = None
            self._loaded = None
            self._progress(f"Could not load {name} ({error}); loading {previous.name} again", None)
            status = self.load()
            if status.state == "ready":
                self._status = replace(status, note=f"Switching to {name} failed: {error}")
        finally:
            self._switching = None

    def _requests_running(self) -> int:
        return sum(running() for running, _ in self._users)

    def _wait_for_requests(self, name: str) -> None:
        deadline = time.monotonic() + self.drain_seconds
        while (running := self._requests_running()) and time.monotonic() < deadline:
            self._status = LoadStatus("loading", f"Switching to {name}: waiting for {running} request(s)")
            time.sleep(0.05)

    def _unload(self, reason: str) -> None:
        for _, release in self._users:
            release(reason)
        self._loaded = None
        free_memory()


def free_memory() -> None:
    """Give back what dropped models held: reference cycles (hooks, PEFT wrappers) need a collection."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def plan_switches_together(holders: dict[str, ModelHolder]) -> None:
    """A model switched in is planned together with the models that stay, as they were planned at start.

    With default budgets (free memory now) the model staying is counted twice: safe, if conservative.
    """
    for role, holder in holders.items():
        holder.planner = partial(_replan, holders, role)


def _replan(holders: dict[str, ModelHolder], role: str, spec: ModelSpec) -> ModelSpec:
    return with_joint_plan({r: spec if r == role else h.spec for r, h in holders.items()})[role]
