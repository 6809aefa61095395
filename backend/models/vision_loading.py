"""BLIP-2, InstructBLIP and LLaVA (transformers' ports): which family a checkpoint is, and loading it.

Prompts and image encoding: `backend.decode.image_prompts`; generation: `backend.decode.vision_replies`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from backend.errors import UserError
from backend.models.demo_text import is_demo_model_dir
from backend.models.demo_vision import DEMO_VISION_MODELS, demo_vision_model_dir
from backend.models.hub import resolve_model_dir
from backend.models.loading import (
    ModelSpec,
    ProgressFn,
    context_window,
    linear_kernels,
    plan_placement,
    quantization_config,
    remote_code,
)
from backend.models.row_kernels import KernelBuild
from backend.placement.plans import DevicePlan

log = logging.getLogger(__name__)

BLIP_FAMILIES = ("blip-2", "instructblip")
LLAVA_FAMILIES = ("llava", "llava_next")
FAMILIES = BLIP_FAMILIES + LLAVA_FAMILIES


class UnsupportedModel(UserError, ValueError):
    """The model is not one of the vision families this playground knows."""


@dataclass
class LoadedVision:
    model: torch.nn.Module
    processor: Any
    family: str  # one of FAMILIES
    spec: ModelSpec
    path: Path
    is_demo: bool
    plan: DevicePlan
    dtype: torch.dtype
    load_seconds: float
    notes: list[str] = field(default_factory=list)
    kernels: str = ""  # which linear kernels run (backend.models.packed_weights)
    awaiting_kernels: KernelBuild | None = None  # packed for oneDNN while the row kernels build

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def context_window(self) -> int:
        return context_window(self.model.config.get_text_config(), self.tokenizer)

    @property
    def language_model(self) -> torch.nn.Module:
        """The text decoder (BLIP: with its head; LLaVA: the base model, the head is `model.lm_head`)."""
        inner = getattr(self.model, "model", self.model)  # LLaVA nests it in .model
        return inner.language_model


def detect_family(config) -> str:
    """The vision family from the config's model_type, never from the name (a renamed directory keeps it)."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModel(
            f"model_type {model_type!r} is not a supported vision model; supported: {', '.join(FAMILIES)}"
        )
    return model_type


def vision_model_files(spec: ModelSpec, progress: ProgressFn) -> Path:
    if spec.name in DEMO_VISION_MODELS:
        progress(f"Preparing the built-in demo model {spec.name}", None)
        return demo_vision_model_dir(spec.name)
    return resolve_model_dir(spec.name, progress)


def load_vision_model(spec: ModelSpec, progress: ProgressFn | None = None) -> LoadedVision:
    """Resolve, plan and load like `loading.load_text_model`.

    bitsandbytes leaves the model's `_keep_in_fp32_modules` unquantized: BLIP-2's Q-Former and query
    tokens (upcast to fp32 only for fp16 loads), InstructBLIP's query tokens (its Q-Former is quantized).
    """
    report = progress or (lambda stage, fraction: None)
    started = time.perf_counter()
    path = vision_model_files(spec, report)
    trust = remote_code(spec)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    family = detect_family(config)
    plan, dtype, notes = plan_placement(spec, config, AutoModelForImageTextToText)
    report(f"Loading processor from {path}", None)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust)
    if family in BLIP_FAMILIES:
        _check_blip_checkpoint(config, processor, notes)
    report(f"Loading weights ({spec.quantization}, {str(dtype).removeprefix('torch.')})", None)
    model = AutoModelForImageTextToText.from_pretrained(
        path,
        dtype=dtype,
        device_map=plan.device_map,
        quantization_config=quantization_config(spec.quantization, dtype, plan.offloaded),
        trust_remote_code=trust,
        use_safetensors=True,
        offload_folder=spec.offload_dir,
    )
    model.eval()
    kernels, awaiting = linear_kernels(model, spec, plan)
    seconds = time.perf_counter() - started
    log.info("Loaded %s (%s) in %.1f s (%s, %s)", spec.name, family, seconds, spec.quantization, dtype)
    return LoadedVision(
        model, processor, family, spec, path, is_demo_model_dir(path), plan, dtype, seconds, notes, kernels,
        awaiting,
    )  # fmt: skip


def _check_blip_checkpoint(config, processor, notes: list[str]) -> None:
    """Old BLIP-2 snapshots lack the image token; without it the image would be silently ignored."""
    if getattr(config, "image_token_id", None) is None:
        raise UnsupportedModel(
            "this BLIP checkpoint's config has no image_token_index; use a current revision of the model"
        )
    if getattr(processor, "num_query_tokens", None) is None:
        processor.num_query_tokens = config.num_query_tokens
        notes.append(f"The processor lacks num_query_tokens; using the model's {config.num_query_tokens}.")
