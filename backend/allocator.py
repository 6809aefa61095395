"""The C allocator under a server that runs for days: fewer arenas, and freed memory handed back.

Measured with benchmarks/memory_profile.py (docs/serving.md has the numbers): under sustained load the
bytes Python holds and the bytes glibc has in use stay flat, while the memory glibc keeps *free* inside
its heaps grows (one arena per thread that ever allocated, 16 here), and RSS grows with it. Fewer
arenas and a periodic malloc_trim(0), which gives free pages inside every arena back to the system,
keep it flat. glibc only: elsewhere (musl, macOS) these do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # mallopt parameter numbers, from glibc's <malloc.h>


@dataclass(frozen=True)
class AllocatorPolicy:
    arena_max: int | None = 2  # None: glibc's default (8 per core)
    trim_seconds: float | None = 30.0  # how often freed memory is handed back; None: never


def _glibc():
    """glibc's handle, or None where the C library is another one."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        return libc
    except (OSError, AttributeError):
        return None


def trim() -> bool:
    """Hand the free memory inside every arena back to the system (malloc_trim(0)); False off glibc."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


class AllocatorKeeper:
    """Applies an AllocatorPolicy for this process: call `start()` once, early (before threads start)."""

    def __init__(self, policy: AllocatorPolicy):
        self.policy = policy
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> AllocatorKeeper:
        libc = _glibc()
        if libc is None:
            return self
        # An operator who set MALLOC_ARENA_MAX chose for themselves.
        if self.policy.arena_max is not None and "MALLOC_ARENA_MAX" not in os.environ:
            libc.mallopt(M_ARENA_MAX, self.policy.arena_max)
        if self.policy.trim_seconds:
            self._thread = threading.Thread(target=self._trim_loop, name="malloc-trim", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _trim_loop(self) -> None:
        while not self._stop.wait(self.policy.trim_seconds):
            trim()
