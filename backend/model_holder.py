"""Loads the text model in the background and says how far it got, so the UI can start at once.

Falls back to the built-in demo model when the configured one cannot be loaded, and says why.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from backend.demo_models import DEMO_TEXT_MODEL
from backend.errors import ModelNotReady
from backend.hub import ModelUnavailable
from backend.loading import LoadedModel, ModelSpec, load_text_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadStatus:
    state: str  # "loading", "ready" or "failed"
    stage: str
    fraction: float | None = None
    fallback_reason: str | None = None  # why the demo model stands in for the configured one


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
    ):
        self.spec = spec
        self.fallback_to_demo = fallback_to_demo
        self.loader = loader
        self.demo_name = demo_name
        self._status = LoadStatus("loading", "Waiting to start")
        self._loaded: LoadedModel | None = None
        self._thread: threading.Thread | None = None

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

    def get(self) -> LoadedModel:
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
        self._status = LoadStatus("loading", stage, fraction)
