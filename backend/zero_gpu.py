"""ZeroGPU on Hugging Face Spaces: a GPU is attached only while a `spaces.GPU` function runs.

`on_gpu` marks the handlers that generate. Where the `spaces` package is missing (anywhere but a
Space) it returns the function unchanged; on a Space without ZeroGPU, `spaces.GPU` itself does nothing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


def spaces_module():
    """The `spaces` package, or None where it is not installed."""
    try:
        return importlib.import_module("spaces")
    except ImportError:
        return None


def on_gpu(fn: F) -> F:
    """`spaces.GPU(fn)` when `spaces` is importable, else `fn` itself."""
    spaces = spaces_module()
    return fn if spaces is None else spaces.GPU(fn)
