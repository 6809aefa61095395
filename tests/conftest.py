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


@pytest.fixture(scope="session")
def demo_text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from backend.demo_models import demo_text_model_dir

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
