"""The allocator policy app.py applies at start: fewer glibc arenas, freed memory handed back periodically."""

from __future__ import annotations

import threading

import backend.allocator as allocator
from backend.allocator import M_ARENA_MAX, AllocatorKeeper, AllocatorPolicy


class FakeLibc:
    def __init__(self):
        self.mallopt_calls = []
        self.trimmed = threading.Event()

    def mallopt(self, parameter, value):
        self.mallopt_calls.append((parameter, value))
        return 1

    def malloc_trim(self, pad):
        self.trimmed.set()
        return 1


def test_arenas_are_limited_and_memory_is_trimmed_until_stopped(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(allocator, "_glibc", lambda: libc)
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    keeper = AllocatorKeeper(AllocatorPolicy(arena_max=2, trim_seconds=0.01)).start()
    assert libc.mallopt_calls == [(M_ARENA_MAX, 2)]
    assert libc.trimmed.wait(30)
    keeper.stop()
    libc.trimmed.clear()
    assert not keeper._thread.is_alive()


def test_an_operators_own_setting_and_other_c_libraries_are_left_alone(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(allocator, "_glibc", lambda: libc)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    AllocatorKeeper(AllocatorPolicy(trim_seconds=None)).start()
    assert libc.mallopt_calls == []
    monkeypatch.setattr(allocator, "_glibc", lambda: None)  # musl, macOS
    keeper = AllocatorKeeper(AllocatorPolicy()).start()
    assert keeper._thread is None and allocator.trim() is False


def test_this_machines_glibc_is_found_and_trims():
    assert allocator.trim() is True  # the CI machine is Debian: glibc
