"""Find a model's files: a local directory, the local Hub cache, or the Hub if it answers fast.

Checking the cache first and probing the Hub with a short timeout means an offline machine
learns in seconds (not after minutes of retries) that it must fall back to the demo model.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.utils import tqdm as hub_tqdm

# Safetensors only: a .bin checkpoint is a pickle and can run code when loaded.
MODEL_FILE_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
PROBE_TIMEOUT_SECONDS = 3.0


class ModelUnavailable(Exception):
    """The model's files cannot be had here; the message says why."""


def is_offline() -> bool:
    return constants.is_offline_mode() or os.environ.get("TRANSFORMERS_OFFLINE", "") in ("1", "true", "TRUE")


def hub_reachable(endpoint: str | None = None, timeout: float = PROBE_TIMEOUT_SECONDS) -> bool:
    """A TCP connect to the Hub endpoint: answers in at most `timeout` seconds."""
    url = urlparse(endpoint or constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_model_dir(name: str, progress: Callable[[str, float | None], None] | None = None) -> Path:
    """A local directory holding the model's config, tokenizer and safetensors weights."""
    report = progress or (lambda stage, fraction: None)
    if not name.strip():
        raise ModelUnavailable("No model name given")  # Path("") is ".", the working directory
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelUnavailable(f"'{name}' is neither a local directory nor a Hub id like 'org/model'")
    report(f"Looking for {name} in the local cache", None)
    try:
        return Path(snapshot_download(name, local_files_only=True, allow_patterns=MODEL_FILE_PATTERNS))
    except LocalEntryNotFoundError:
        pass
    if is_offline():
        raise ModelUnavailable(f"{name} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
    if not hub_reachable():
        raise ModelUnavailable(f"{name} is not cached and the Hub ({constants.ENDPOINT}) cannot be reached")
    report(f"Downloading {name}", 0.0)
    path = Path(
        snapshot_download(name, allow_patterns=MODEL_FILE_PATTERNS, tqdm_class=progress_bar(name, report))
    )
    if not any(path.glob("*.safetensors")):
        raise ModelUnavailable(f"{name} has no safetensors weights; pickled .bin checkpoints are not loaded")
    return path


def progress_bar(name: str, report: Callable[[str, float | None], None]) -> type[hub_tqdm]:
    """A tqdm class for snapshot_download that also reports its byte counts to `report`."""

    class ReportingTqdm(hub_tqdm):
        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)
            if self.unit == "B" and self.total:
                gigabytes = f"{self.n / 1e9:.2f} of {self.total / 1e9:.2f} GB"
                report(f"Downloading {name}: {gigabytes}", min(1.0, self.n / self.total))
            return shown

    return ReportingTqdm
