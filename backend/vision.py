"""Captions and visual chat with BLIP-2, InstructBLIP and LLaVA (transformers' ports), loaded like text LMs.

Sampling and greedy decoding go through `backend.generation.stream_generate` (per-request seed, stop
words, cancel between steps): a custom prefill runs the first forward pass with the image and the
later steps run on the language model alone, with the image in its KV cache. BLIP-2/InstructBLIP
merge the Q-Former features into the prompt embeddings as their generate() does; a Flan-T5 BLIP-2
encodes once and streams its decoder. Beams use the model's own generate() and come whole.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, DynamicCache

from backend.chat_service import prompt_budget
from backend.demo_models import is_demo_model_dir
from backend.device_plan import DevicePlan
from backend.engine import Engine
from backend.errors import BadImage, BadInput, ContextOverflow, UserError
from backend.generation import (
    ContinuationDecoder,
    GenerationUpdate,
    beam_config,
    eos_token_ids,
    input_device,
    stream_generate,
)
from backend.hub import resolve_model_dir
from backend.loading import ModelSpec, ProgressFn, plan_placement, quantization_config, remote_code
from backend.prompting import Turn, context_window, vicuna_prompt
from backend.replies import Reply, ReplyStream, replies_from_updates
from backend.settings import GenerationSettings
from backend.stopping import StopWordMatcher
from backend.vision_demo import DEMO_VISION_MODELS, demo_vision_model_dir

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


def caption_stream(
    loaded: LoadedVision,
    image: Image.Image,
    question: str,
    settings: GenerationSettings,
    engine: Engine | None = None,
) -> Iterator[Reply]:
    """Caption `image` or answer `question` about it; bad input raises here, before the stream starts.

    With `engine` (one decoding `engine_model(loaded)`), the request joins that engine's batch.
    """
    settings = settings.with_seed()
    inputs = encode_image_prompt(loaded, image, caption_prompt(loaded.family, loaded.processor, question))
    check_fits(loaded, inputs, settings.max_new_tokens)
    return _replies(loaded, inputs, settings, engine, None)


def chat_with_image_stream(
    loaded: LoadedVision,
    image: Image.Image,
    history: list[Turn],
    message: str,
    settings: GenerationSettings,
    engine: Engine | None = None,
) -> Iterator[Reply]:
    """LLaVA visual chat: the image stays in the first user turn; the oldest turns go first when too long."""
    if loaded.family not in LLAVA_FAMILIES:
        raise UnsupportedModel(
            f"visual chat needs a LLaVA model; this {loaded.family} model answers one question at a time"
        )
    if not isinstance(message, str) or not message.strip():
        raise BadInput("Message is empty: type something to send.")
    settings = settings.with_seed()
    for dropped in range(len(history) + 1):
        text = render_llava_chat(loaded.processor, settings.system_prompt, history[dropped:], message.strip())
        inputs = encode_image_prompt(loaded, image, text)
        problem = overflow(loaded, inputs, settings.max_new_tokens)
        if problem is None:
            break
    else:
        raise ContextOverflow(problem)
    notice = None
    if dropped:
        turns = "turn was" if dropped == 1 else "turns were"
        notice = f"The {dropped} oldest {turns} left out to fit the model's context window."
    return _replies(loaded, inputs, settings, engine, notice)


@dataclass(frozen=True)
class ImagePrefill:
    """How stream_generate runs a vision model: the image goes in with the first forward pass only."""

    prompt_ids: list[int]  # what the reply continues (an encoder-decoder's: just the start token)
    prefill: Callable[[], Any]  # the first forward pass, image included; returns logits + KV cache
    decode_model: Callable[..., Any]  # each later single-token step


def image_prefill(loaded: LoadedVision, inputs: dict) -> ImagePrefill:
    model = loaded.model
    prompt_ids = inputs["input_ids"][0].tolist()
    if loaded.family in LLAVA_FAMILIES:

        @torch.inference_mode()
        def prefill():  # logits_to_keep: the prompt's logits would cost tokens x vocab floats
            return model(**inputs, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)

        return ImagePrefill(prompt_ids, prefill, model)
    if model.config.use_decoder_only_language_model:
        return ImagePrefill(prompt_ids, _blip_prefill(model, inputs), model.language_model)
    prefill, step = _blip_seq2seq_steps(model, inputs)
    return ImagePrefill([model.language_model.config.decoder_start_token_id], prefill, step)


def engine_model(loaded: LoadedVision) -> torch.nn.Module | None:
    """The causal LM a batching engine decodes for this model (LLaVA itself, a decoder-only BLIP-2's
    language model); None for Flan-T5 BLIP-2, whose decoder steps need the encoder's output."""
    if loaded.family in LLAVA_FAMILIES:
        return loaded.model
    return loaded.model.language_model if loaded.model.config.use_decoder_only_language_model else None


def _replies(
    loaded: LoadedVision,
    inputs: dict,
    settings: GenerationSettings,
    engine: Engine | None,
    notice: str | None,
) -> Iterator[Reply]:
    if settings.mode == "beam":
        updates, end = _beam_updates(loaded, inputs, settings), None
    else:
        plan = image_prefill(loaded, inputs)
        if engine is not None:  # submitted now: a full queue refuses before anything is shown
            handle = engine.submit(plan.prompt_ids, settings, prefill=plan.prefill)
            updates, end = iter(handle), handle.cancel
        else:  # a generator: nothing runs before the caller asks for the first update
            updates = stream_generate(
                loaded.model,
                loaded.tokenizer,
                plan.prompt_ids,
                settings,
                prefill=plan.prefill,
                decode_model=plan.decode_model,
            )
            end = None
    replies = replies_from_updates(updates, settings, notice, prompt_size(inputs))
    return ReplyStream(replies, end) if end is not None else replies


def _beam_updates(
    loaded: LoadedVision, inputs: dict, settings: GenerationSettings
) -> Iterator[GenerationUpdate]:
    yield generate_beam_with_image(loaded, inputs, settings)


def _blip_image_embeds(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings with the Q-Former's projected features written over the image tokens."""
    image_inputs = {"pixel_values": inputs["pixel_values"]}
    if "qformer_input_ids" in inputs:  # InstructBLIP: the Q-Former also reads the instruction
        image_inputs["qformer_input_ids"] = inputs["qformer_input_ids"]
        image_inputs["qformer_attention_mask"] = inputs.get("qformer_attention_mask")
    features = model.get_image_features(**image_inputs, return_dict=True).pooler_output
    input_ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(input_ids)
    mask = (input_ids == model.config.image_token_id).unsqueeze(-1).to(embeds.device)
    if int(mask.sum()) != features.shape[0] * features.shape[1]:
        raise ValueError(
            f"the prompt has {int(mask.sum())} image tokens but the Q-Former gives {features.shape[1]} "
            "features: the processor's num_query_tokens does not match the model's"
        )
    return embeds.masked_scatter(mask, features.to(embeds.device, embeds.dtype)), inputs["attention_mask"]


def _blip_prefill(model, inputs: dict) -> Callable[[], Any]:
    """What Blip2/InstructBlipForConditionalGeneration.generate does before handing over to the LM."""

    @torch.inference_mode()
    def prefill():
        embeds, mask = _blip_image_embeds(model, inputs)
        return model.language_model(
            inputs_embeds=embeds,
            attention_mask=mask,
            past_key_values=DynamicCache(),  # full layers, as the engine's batch keeps (see engine._admit)
            use_cache=True,
            logits_to_keep=1,
        )

    return prefill


def _blip_seq2seq_steps(model, inputs: dict) -> tuple[Callable[[], Any], Callable[..., Any]]:
    """BLIP-2 with Flan-T5: encode prompt + image once; each step feeds the decoder one token.

    Repetition penalty then sees the decoder's tokens only, as in generate().
    """
    lm = model.language_model
    state: dict[str, Any] = {}

    @torch.inference_mode()
    def prefill():
        embeds, state["mask"] = _blip_image_embeds(model, inputs)
        state["encoder"] = lm.get_encoder()(inputs_embeds=embeds, attention_mask=state["mask"])
        start = torch.tensor([[lm.config.decoder_start_token_id]], device=embeds.device)
        return step(input_ids=start, past_key_values=None, use_cache=True)

    def step(input_ids, past_key_values, use_cache=True):
        return lm(
            encoder_outputs=state["encoder"],
            attention_mask=state["mask"],
            decoder_input_ids=input_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )

    return prefill, step


def generate_beam_with_image(
    loaded: LoadedVision, inputs: dict, settings: GenerationSettings
) -> GenerationUpdate:
    """Best beam, whole, from the model's own generate() (which merges the image itself)."""
    model, tokenizer = loaded.model, loaded.tokenizer
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            **inputs, generation_config=beam_config(model, tokenizer, settings), tokenizer=tokenizer
        )
    # Decoder-only LMs return the prompt too; an encoder-decoder's output starts with the start token.
    encoder_decoder = model.config.get_text_config().is_encoder_decoder
    prompt_ids = inputs["input_ids"][0].tolist()
    generated = output[0, 1 if encoder_decoder else len(prompt_ids) :].tolist()
    finish_reason = "length"
    eos_ids = eos_token_ids(model, tokenizer)
    for index, token in enumerate(generated):
        if token in eos_ids:
            generated, finish_reason = generated[:index], "eos"
            break
    context = [] if encoder_decoder else prompt_ids
    cut = StopWordMatcher(settings.stop_words).feed(
        ContinuationDecoder(tokenizer, context).decode(generated), final=True
    )
    seconds = time.perf_counter() - started
    reason = "stop_word" if cut.stopped else finish_reason
    return GenerationUpdate(cut.visible, len(generated), True, reason, seconds, seconds)
