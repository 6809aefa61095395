from __future__ import annotations

import socket
from pathlib import Path

import pytest
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError

import backend.models.hub as hub
from backend.models.hub import (
    PROBE_TIMEOUT_SECONDS,
    ModelUnavailable,
    hub_reachable,
    is_offline,
    resolve_model_dir,
)

CLOSED_LOOPBACK = "http://127.0.0.1:9"  # discard port on loopback: nothing listens, refused at once


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def online_to_closed_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline mode off, the Hub endpoint a closed loopback port, and no real download possible."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", CLOSED_LOOPBACK)
    monkeypatch.setattr(constants, "ENDPOINT", CLOSED_LOOPBACK)
    original = hub.snapshot_download

    def cache_only(*args, **kwargs):
        if not kwargs.get("local_files_only"):
            raise AssertionError("tried to download")
        return original(*args, **kwargs)

    monkeypatch.setattr(hub, "snapshot_download", cache_only)


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Every TCP connect attempted, as (address, timeout); each still really made."""
    made: list[tuple] = []
    real = socket.create_connection

    def recording(address, timeout=None, *args, **kwargs):
        made.append((address, timeout))
        return real(address, timeout, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", recording)
    return made


def test_tests_run_offline() -> None:
    assert is_offline()


def test_local_directory_is_used_as_is(tmp_path: Path) -> None:
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    assert resolve_model_dir(str(model_dir)) == model_dir


def test_local_directory_with_tilde(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models" / "m").mkdir(parents=True)
    assert resolve_model_dir("~/models/m") == tmp_path / "models" / "m"


def test_unknown_model_offline_fails_fast(empty_cache, offline, connections, monkeypatch) -> None:
    # Fast means no network at all: no probe of the Hub, no download, only the cache is read.
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: pytest.fail("probed the Hub while offline"))
    with pytest.raises(ModelUnavailable, match="HF_HUB_OFFLINE"):
        resolve_model_dir("nobody/missing-model")
    assert connections == []


def test_cached_model_found_offline(empty_cache: Path, offline) -> None:
    commit = "a" * 40
    repo = empty_cache / "models--org--cached-model"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    stages: list[str] = []
    path = resolve_model_dir("org/cached-model", lambda stage, fraction: stages.append(stage))
    assert path == snapshot
    assert any("cache" in stage for stage in stages)


def test_unreachable_hub_fails_fast(empty_cache, online_to_closed_port, connections) -> None:
    # Fast means one bounded probe of the configured endpoint and then no download (the fixture refuses one),
    # not the minutes of retries a download would spend.
    assert not is_offline()
    with pytest.raises(ModelUnavailable, match="cannot be reached"):
        resolve_model_dir("nobody/missing-model")
    assert connections == [(("127.0.0.1", 9), PROBE_TIMEOUT_SECONDS)]
    assert 0 < PROBE_TIMEOUT_SECONDS <= 5


def test_hub_reachable_false_for_closed_port(connections) -> None:
    assert not hub_reachable(CLOSED_LOOPBACK, timeout=2.0)
    assert connections == [(("127.0.0.1", 9), 2.0)]  # one attempt, bounded by the timeout: no retries


def test_hub_reachable_true_for_listening_port() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        assert hub_reachable(f"http://127.0.0.1:{port}", timeout=2.0)


def test_hub_reachable_reads_the_configured_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub_reachable(timeout=2.0)
    monkeypatch.setattr(constants, "ENDPOINT", CLOSED_LOOPBACK)
    assert not hub_reachable(timeout=2.0)


def test_download_without_safetensors_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_cache
) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    calls: list[dict] = []

    def fake_snapshot_download(name, **kwargs):
        calls.append(kwargs)
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        return str(pickled)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(ModelUnavailable, match="safetensors"):
        resolve_model_dir("org/pickled-model")
    assert len(calls) == 2
    assert all("*.bin" not in kwargs["allow_patterns"] for kwargs in calls)
    (pickled / "model.safetensors").write_bytes(b"")
    assert resolve_model_dir("org/pickled-model") == pickled


@pytest.mark.parametrize("name", ["../x", "./nope", "/no/such/dir", "a/b/c", "plainname", "", "   "])
def test_invalid_names(name: str, empty_cache, offline) -> None:
    with pytest.raises(ModelUnavailable):
        resolve_model_dir(name)
