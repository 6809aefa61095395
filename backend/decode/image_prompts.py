"""Prompts and inputs for BLIP-2, InstructBLIP and LLaVA: each family's prompt form, the image with it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jinja2 import TemplateError
from PIL import Image

from backend.errors import BadImage, ContextOverflow
from backend.models.loading import input_device
from backend.models.vision_loading import LLAVA_FAMILIES, LoadedVision, UnsupportedModel
from backend.prompting import Turn, prompt_budget, vicuna_prompt

INSTRUCTBLIP_DEFAULT_PROMPT = "A short image description:"
LLAVA_DEFAULT_QUESTION = "Describe the image."


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


def llava_messages(
    system_prompt: str, history: list[Turn], message: str, images_per_turn: Sequence[int] | None = None
) -> list[dict]:
    """Chat messages with image placeholders: `images_per_turn[i]` of them before user turn i's text
    (the history's turns, then `message`). None: one image, in the first user turn, where it stays."""
    messages = [{"role": "system", "content": [_text(system_prompt)]}] if system_prompt.strip() else []
    users = [turn.user for turn in history] + [message]
    answers = [turn.assistant for turn in history]
    counts = _image_counts(images_per_turn, len(users))
    for index, user in enumerate(users):
        parts = [{"type": "image"} for _ in range(counts[index])] + [_text(user)]
        messages.append({"role": "user", "content": parts})
        if index < len(answers):
            messages.append({"role": "assistant", "content": [_text(answers[index])]})
    return messages


def _image_counts(images_per_turn: Sequence[int] | None, turns: int) -> list[int]:
    if images_per_turn is None:
        return [1] + [0] * (turns - 1)
    if len(images_per_turn) != turns:
        raise ValueError(f"images are placed in {len(images_per_turn)} user turns, but there are {turns}")
    return list(images_per_turn)


def render_llava_chat(
    processor,
    system_prompt: str,
    history: list[Turn],
    message: str,
    images_per_turn: Sequence[int] | None = None,
) -> str:
    """The processor's chat template; without one, LLaVA-1.5's Vicuna v1 format, said explicitly.

    Each user turn's images come before its text, as llava-hf's templates put them.
    """
    if not getattr(processor, "chat_template", None):
        image = getattr(processor, "image_token", "<image>") + "\n"
        counts = _image_counts(images_per_turn, len(history) + 1)
        turns = [Turn(image * n + t.user, t.assistant) for n, t in zip(counts, history, strict=False)]
        return vicuna_prompt(system_prompt, turns, image * counts[-1] + message)
    messages = llava_messages(system_prompt, history, message, images_per_turn)
    try:
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateError:
        # Some templates refuse a system role: fold it into the first user turn (its text is last).
        merged = llava_messages("", history, message, images_per_turn)
        merged[0]["content"][-1] = _text(f"{system_prompt.strip()}\n\n{merged[0]['content'][-1]['text']}")
        return processor.apply_chat_template(merged, add_generation_prompt=True, tokenize=False)


def _text(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


# ----------------------------------------------------------------------------- inputs


def _rgb(image) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise BadImage("No image was given; please upload one.")
    return image if image.mode == "RGB" else image.convert("RGB")


def encode_image_prompt(
    loaded: LoadedVision, image: Image.Image | Sequence[Image.Image], prompt: str
) -> dict[str, torch.Tensor]:
    """Processor outputs on the model's devices; floating tensors (pixels) in the vision tower's dtype.

    `image` may be a sequence, in the order of the prompt's image placeholders (LLaVA: one block of
    image tokens each); an empty one encodes the text alone.
    """
    several = isinstance(image, (list, tuple))
    images = ([_rgb(one) for one in image] or None) if several else _rgb(image)
    bos = loaded.tokenizer.bos_token
    # Like prompting.encode_rendered: exactly one BOS whether or not a chat template wrote it.
    add_bos = not (bos and prompt.startswith(bos))
    inputs = loaded.processor(images=images, text=prompt, return_tensors="pt", add_special_tokens=add_bos)
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
            f"The prompt needs {length} tokens ({_images_in(inputs)} included) but only {budget} fit in the "
            "context window after room for the reply. Shorten the text or lower max_new_tokens."
        )
    qformer_ids = inputs.get("qformer_input_ids")
    qformer_config = getattr(loaded.model.config, "qformer_config", None)
    qformer_limit = getattr(qformer_config, "max_position_embeddings", 0)
    if qformer_ids is not None and qformer_limit and qformer_ids.shape[-1] > qformer_limit:
        return f"The question is {qformer_ids.shape[-1]} tokens; the Q-Former reads at most {qformer_limit}."
    return None


def _images_in(inputs: dict[str, torch.Tensor]) -> str:
    pixels = inputs.get("pixel_values")
    count = 0 if pixels is None else int(pixels.shape[0])
    return "image" if count <= 1 else f"its {count} images"


def prompt_size(inputs: dict[str, torch.Tensor]) -> int:
    """Tokens the language model reads, image placeholders included (API usage counts)."""
    return int(inputs["input_ids"].shape[-1])
