"""A model's config.json without its weights and without the network, for planning devices.

Looked up in order: a local model directory; the configs of the presets' real checkpoints shipped in
assets/model_configs/<org>--<name>/; the built-in demo models; the local Hugging Face cache.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import try_to_load_from_cache
from transformers import AutoConfig

from backend.models.demo_text import DEMO_TEXT_MODEL, demo_text_model_dir
from backend.models.demo_vision import DEMO_VISION_MODELS, demo_vision_model_dir
from backend.models.hub import ModelUnavailable

SHIPPED_CONFIGS = Path(__file__).resolve().parents[2] / "assets" / "model_configs"


def shipped_names() -> list[str]:
    """Hub ids whose config ships with the project."""
    return sorted(path.parent.name.replace("--", "/", 1) for path in SHIPPED_CONFIGS.glob("*/config.json"))


def config_path(name: str) -> Path:
    """The config.json for a local directory, a shipped preset, a demo model or a cached Hub id."""
    local = Path(name).expanduser()
    if (local / "config.json").is_file():
        return local / "config.json"
    shipped = SHIPPED_CONFIGS / name.replace("/", "--", 1) / "config.json"
    if name.count("/") == 1 and shipped.is_file():
        return shipped
    if name == DEMO_TEXT_MODEL:
        return demo_text_model_dir() / "config.json"
    if name in DEMO_VISION_MODELS:
        return demo_vision_model_dir(name) / "config.json"
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        cached = try_to_load_from_cache(name, "config.json")
        if isinstance(cached, str):
            return Path(cached)
    raise ModelUnavailable(
        f"no config for {name!r}: not a local model directory, not one of the shipped configs "
        f"({', '.join(shipped_names())}) and not in the local Hugging Face cache"
    )


def load_config(name: str):
    return AutoConfig.from_pretrained(config_path(name).parent, trust_remote_code=False)
