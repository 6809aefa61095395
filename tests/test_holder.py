from __future__ import annotations

from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from backend.errors import ModelNotReady
from backend.models.demo_text import DEMO_TEXT_MODEL
from backend.models.holder import ModelHolder
from backend.models.loading import ModelSpec, load_text_model
from backend.models.packed_weights import PackedLinear

MISSING = "nobody/missing-model"


@pytest.fixture(autouse=True)
def offline_with_demo_cache(demo_text_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline for sure, an empty Hub cache, and the session's demo model as the playground cache."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("PLAYGROUND_CACHE", str(demo_text_dir.parent.parent))


def test_get_before_load() -> None:
    holder = ModelHolder(ModelSpec(DEMO_TEXT_MODEL))
    assert holder.status().state == "loading"
    with pytest.raises(ModelNotReady, match="still loading"):
        holder.get()


def test_missing_model_falls_back_to_demo(demo_text_dir: Path) -> None:
    holder = ModelHolder(ModelSpec(MISSING, quantization="4bit", dtype="float32"))
    assert holder.loaded_name == MISSING
    holder.start()
    status = holder.wait(timeout=60)
    assert status.state == "ready"
    assert status.fallback_reason and MISSING in status.fallback_reason
    assert holder.is_demo
    assert holder.loaded_name == DEMO_TEXT_MODEL
    loaded = holder.get()
    assert loaded.path == demo_text_dir
    assert loaded.spec.quantization == "none"  # the demo stands in unquantized
    linears = [m for m in loaded.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) in (torch.nn.Linear, PackedLinear) for m in linears)  # none quantized


def test_no_fallback_means_failed() -> None:
    holder = ModelHolder(ModelSpec(MISSING), fallback_to_demo=False)
    status = holder.load()
    assert status.state == "failed"
    assert MISSING in status.stage
    assert not holder.is_demo
    with pytest.raises(ModelNotReady, match="failed to load") as caught:
        holder.get()
    assert MISSING in str(caught.value)


def test_configured_model_loads_without_fallback(demo_text_dir: Path) -> None:
    holder = ModelHolder(ModelSpec(str(demo_text_dir), dtype="float32"))
    status = holder.load()
    assert status.state == "ready"
    assert status.fallback_reason is None
    assert holder.get().path == demo_text_dir


def test_demo_failing_too() -> None:
    def broken(spec, progress=None):
        raise RuntimeError(f"cannot load {spec.name}")

    status = ModelHolder(ModelSpec(MISSING), loader=broken).load()
    assert status.state == "failed"
    assert MISSING in status.stage and "demo model failed too" in status.stage
    demo_only = ModelHolder(ModelSpec(DEMO_TEXT_MODEL), loader=broken).load()
    assert demo_only.state == "failed"  # no second try at the same demo
    assert "failed too" not in demo_only.stage


def test_progress_is_visible_while_loading() -> None:
    seen = []

    def observed(spec, progress=None):
        def report(stage, fraction):
            progress(stage, fraction)
            seen.append(holder.status())

        return load_text_model(spec, report)

    holder = ModelHolder(ModelSpec(DEMO_TEXT_MODEL, dtype="float32"), loader=observed)
    holder.load()
    assert seen and all(s.state == "loading" for s in seen)
    assert any("tokenizer" in s.stage for s in seen)
    assert holder.status().state == "ready"
