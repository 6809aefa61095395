"""What a model source says of itself: how far loading got, and what the UI shows of the model."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoadStatus:
    state: str  # "loading", "ready" or "failed"
    stage: str
    fraction: float | None = None
    fallback_reason: str | None = None  # why the demo model stands in for the configured one
    note: str | None = None  # what else the user should know, e.g. that a model switch failed


@dataclass(frozen=True)
class ModelInfo:
    """What the banner and the System tab show of the model answering now."""

    name: str
    location: str  # the files it was loaded from, or the backend server's URL
    quantization: str
    dtype: str
    context_window: int | str
    load_seconds: float
    places: tuple[str, ...]  # where its weights are: devices, or the backend server
    notes: tuple[str, ...] = ()  # what the user should know, beyond the plan's warnings
    is_demo: bool = False
    kernels: str = ""  # which linear kernels run (backend.models.packed_weights)
