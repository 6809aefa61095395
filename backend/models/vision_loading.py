"""BLIP-2, InstructBLIP and LLaVA (transformers' ports): loading, prompts and image encoding.

Generation is in `backend.decode.vision_replies`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from backend.decode.generation import (
    input_device,
)
from backend.errors import BadImage, ContextOverflow, UserError
from backend.models.demo_text import is_demo_model_dir
from backend.models.demo_vision import DEMO_VISION_MODELS, demo_vision_model_dir
from backend.models.hub import resolve_model_dir
from backend.models.loading import ModelSpec, ProgressFn, plan_placement, quantization_config, remote_code
from backend.placement.plans import DevicePlan
from backend.prompting import Turn, context_window, prompt_budget, vicuna_prompt

log = logging.getLogger(__name__)

BLIP_FAMILIES = ("blip-2", "instructblip")
LLAVA_FAMILIES = ("llava", "llava_next")
FAMILIES = BLIP_FAMILIES + LLAVA_FAMILIES
INSTRUCTBLIP_DEFAULT_PROMPT = "A short image description:"
LLAVA_DEFAULT_QUESTION = "Describe the image."


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
    seconds = time.perf_counter() - started
    log.info("Loaded %s (%s) in %.1f s (%s, %s)", spec.name, family, seconds, spec.quantization, dtype)
    return LoadedVision(
        model, processor, family, spec, path, is_demo_model_dir(path), plan, dtype, seconds, notes
    )


def _check_blip_checkpoint(config, processor, notes: list[str]) -> None:
    """Old BLIP-2 snapshots lack the image token; without it the image would be silently ignored."""
    if getattr(config, "image_token_id", None) is None:
        raise UnsupportedModel(
            "this BLIP checkpoint's config has no image_token_index; use a current revision of the model"
        )
    if getattr(processor, "num_query_tokens", None) is None:
        processor.num_query_tokens = config.num_query_tokens
        notes.append(f"The processor lacks num_query_tokens; using the model's {config.num_query_tokens}.")


# ----------------------------------------------------------------------------- prompts


def caption_prompt(family: str, processor, question: str) -> str:
    """Prompt text for one image and an optional question, in the form each family was trained on."""
    question = (question or "").strip()
    if family == "blip-2":
        return f"Question: {question} Answer:" if question else ""
    if family == "instructblip":
        return question or INSTRUCTBLIP_DEFAULT_PROMPT
    if family in LLAVA_FAMILIES:
        return render_llava_chat(processor, "", [], question or LLAVA_DEFAULT_QUESTION)
    raise UnsupportedModel(f"no caption prompt for family {family!r}")


def llava_messages(system_prompt: str, history: list[Turn], message: str) -> list[dict]:
    """Chat messages with the image placeholder in the first user turn, where it stays for every reply."""
    messages = [{"role": "system", "content": [_text(system_prompt)]}] if system_prompt.strip() else []
    users = [turn.user for turn in history] + [message]
    answers = [turn.assistant for turn in history]
    for index, user in enumerate(users):
        parts = [{"type": "image"}, _text(user)] if index == 0 else [_text(user)]
        messages.append({"role": "user", "content": parts})
        if index < len(answers):
            messages.append({"role": "assistant", "content": [_text(answers[index])]})
    return messages


def render_llava_chat(processor, system_prompt: str, history: list[Turn], message: str) -> str:
    """The processor's chat template; without one, LLaVA-1.5's Vicuna v1 format, said explicitly."""
    if not getattr(processor, "chat_template", None):
        image = getattr(processor, "image_token", "<image>")
        turns = list(history)
        if turns:
            turns[0] = Turn(f"{image}\n{turns[0].user}", turns[0].assistant)
        else:
            message = f"{image}\n{message}"
        return vicuna_prompt(system_prompt, turns, message)
    messages = llava_messages(system_prompt, history, message)
    try:
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateError:
        # Some templates refuse a system role: fold it into the first user turn.
        merged = llava_messages("", history, message)
        merged[0]["content"][1] = _text(f"{system_prompt.strip()}\n\n{merged[0]['content'][1]['text']}")
        return processor.apply_chat_template(merged, add_generation_prompt=True, tokenize=False)


def _text(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


# ----------------------------------------------------------------------------- inputs


def _rgb(image) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise BadImage("No image was given; please upload one.")
    return image if image.mode == "RGB" else image.convert("RGB")


def encode_image_prompt(loaded: LoadedVision, image: Image.Image, prompt: str) -> dict[str, torch.Tensor]:
    """Processor outputs on the model's devices; floating tensors (pixels) in the vision tower's dtype."""
    bos = loaded.tokenizer.bos_token
    # Like prompting.encode_rendered: exactly one BOS whether or not a chat template wrote it.
    add_bos = not (bos and prompt.startswith(bos))
    inputs = loaded.processor(
        images=_rgb(image), text=prompt, return_tensors="pt", add_special_tokens=add_bos
    )
    device = input_device(loaded.model)
    pixels = _vision_dtype(loaded.model)
    return {
        key: value.to(device, pixels) if value.is_floating_point() else value.to(device)
        for key, value in inputs.items()
    }


def _vision_dtype(model) -> torch.dtype:
    """The dtype of the patch embedding, the layer that receives the pixels."""
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            return module.weight.dtype
    return model.get_input_embeddings().weight.dtype


def check_fits(loaded: LoadedVision, inputs: dict[str, torch.Tensor], max_new_tokens: int) -> None:
    """Raise ContextOverflow unless the prompt (image tokens included) and the reply fit the context."""
    problem = overflow(loaded, inputs, max_new_tokens)
    if problem:
        raise ContextOverflow(problem)


def overflow(loaded: LoadedVision, inputs: dict[str, torch.Tensor], max_new_tokens: int) -> str | None:
    """Why the prompt does not fit, or None when it does."""
    budget = prompt_budget(loaded.context_window, max_new_tokens)
    length = inputs["input_ids"].shape[-1]
    if length > budget:
        return (
            f"The prompt needs {length} tokens (image included) but only {budget} fit in the context "
            "window after room for the reply. Shorten the text or lower max_new_tokens."
        )
    qformer_ids = inputs.get("qformer_input_ids")
    qformer_config = getattr(loaded.model.config, "qformer_config", None)
    qformer_limit = getattr(qformer_config, "max_position_embeddings", 0)
    if qformer_ids is not None and qformer_limit and qformer_ids.shape[-1] > qformer_limit:
        return f"The question is {qformer_ids.shape[-1]} tokens; the Q-Former reads at most {qformer_limit}."
    return None


# ----------------------------------------------------------------------------- generation


def prompt_size(inputs: dict[str, torch.Tensor]) -> int:
    """Tokens the language model reads, image placeholders included (API usage counts)."""
    return int(inputs["input_ids"].shape[-1])
