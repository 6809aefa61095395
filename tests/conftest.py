"""Shared fixtures. Everything runs offline against the locally built demo model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> None:
    """Tiny models run faster on one thread, and then do not fight parallel runs for the cores."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def demo_text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from backend.models.demo_text import demo_text_model_dir

    return demo_text_model_dir(cache_root=tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def demo_tokenizer(demo_text_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_text_dir)


@pytest.fixture(scope="session")
def demo_model(demo_text_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(demo_text_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def demo_vision_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cache root holding every demo vision model (tiny BLIP-2, InstructBLIP, LLaVA), built once."""
    from backend.models.demo_vision import DEMO_VISION_MODELS, demo_vision_model_dir

    root = tmp_path_factory.mktemp("vision-demo")
    for name in DEMO_VISION_MODELS:
        demo_vision_model_dir(name, cache_root=root)
    return root


@pytest.fixture(scope="session")
def demo_vision_dirs(demo_vision_cache: Path) -> dict[str, Path]:
    from backend.models.demo_vision import DEMO_VISION_MODELS, demo_vision_model_dir

    return {name: demo_vision_model_dir(name, cache_root=demo_vision_cache) for name in DEMO_VISION_MODELS}


@pytest.fixture(scope="session")
def image_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """{"good": {name: path}, "bad": {name: (path, expected words)}}, every kind the image issue names."""
    from tests.image_zoo import bad_images, good_images, write_all

    folder = tmp_path_factory.mktemp("image-zoo")
    good = write_all(folder, good_images())
    bad_data = bad_images()
    bad_paths = write_all(folder, {name: data for name, (data, _) in bad_data.items()})
    return {"good": good, "bad": {name: (bad_paths[name], words) for name, (_, words) in bad_data.items()}}


@pytest.fixture(scope="session", autouse=True)
def row_kernels_built():
    """The row kernels (backend.models.row_kernels) built before any test where this CPU takes them, into the
    cache the app reads: the app's models then load on them at once, whatever order tests run in. A cold
    build takes about 25 s, once per machine. None where they cannot run (the reason: unavailable_reason)."""
    from backend.models.demo_text import default_cache_root
    from backend.models.row_kernels import KernelBuild, unavailable_reason

    if unavailable_reason() is not None:
        return None
    build = KernelBuild(default_cache_root() / "kernels").start()
    kernels = build.kernels(wait=900)
    assert kernels is not None, build.text()
    return kernels


@pytest.fixture
def row_kernels(row_kernels_built):
    """The built row kernels; skips where this CPU cannot run them (no AVX512-BF16: oneDNN serves there)."""
    from backend.models.row_kernels import unavailable_reason

    if row_kernels_built is None:
        pytest.skip(f"row kernels unavailable here: {unavailable_reason()}")
    return row_kernels_built
