"""Replies from BLIP-2, InstructBLIP and LLaVA: the image goes in with the first forward pass.

Decoder-only models join a batching engine (`backend.decode.engine`, per-request seed, stop words, cancel
between steps): a custom prefill runs the first forward pass with the image and the later steps
run on the language model alone, with the image in its KV cache. BLIP-2/InstructBLIP merge the
Q-Former features into the prompt embeddings as their generate() does; a Flan-T5 BLIP-2 encodes
once and streams its decoder through `backend.decode.generation.stream_generate`. Beams use the model's
own generate() and come whole.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import DynamicCache

from backend.decode.engine import Engine
from backend.decode.generation import (
    ContinuationDecoder,
    GenerationUpdate,
    beam_config,
    eos_token_ids,
    stream_generate,
)
from backend.decode.image_prompts import (
    caption_prompt,
    check_fits,
    encode_image_prompt,
    overflow,
    prompt_size,
    render_llava_chat,
)
from backend.decode.stopping import StopWordMatcher
from backend.errors import BadInput, ContextOverflow
from backend.images import ConversationImages
from backend.models.vision_loading import LLAVA_FAMILIES, LoadedVision, UnsupportedModel
from backend.prompting import Turn
from backend.replies import Reply, ReplyStream, replies_from_updates
from backend.settings import GenerationSettings


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
    inputs = encode_image_prompt(loaded, image, caption_prompt(loaded.family, loaded.processor, question))
    check_fits(loaded, inputs, settings.max_new_tokens)
    return _replies(loaded, inputs, settings, engine, None)


def chat_with_image_stream(
    loaded: LoadedVision,
    image: Image.Image | ConversationImages,
    history: list[Turn],
    message: str,
    settings: GenerationSettings,
    engine: Engine | None = None,
) -> Iterator[Reply]:
    """LLaVA visual chat; the oldest turns go first when the prompt is too long.

    `image` is a ConversationImages of decoded images, each placed in the user turn that sent it (a
    dropped turn's images go with it), or one image, kept in the first user turn that remains.
    """
    if loaded.family not in LLAVA_FAMILIES:
        raise UnsupportedModel(
            f"visual chat needs a LLaVA model; this {loaded.family} model answers one question at a time"
        )
    if not isinstance(message, str) or not message.strip():
        raise BadInput("Message is empty: type something to send.")
    for dropped in range(len(history) + 1):
        placed = _kept_images(image, dropped, len(history) + 1)
        counts = [len(images) for images in placed]
        text = render_llava_chat(
            loaded.processor, settings.system_prompt, history[dropped:], message.strip(), counts
        )
        inputs = encode_image_prompt(loaded, [one for images in placed for one in images], text)
        problem = overflow(loaded, inputs, settings.max_new_tokens)
        if problem is None:
            break
    else:
        raise ContextOverflow(problem)
    notice = None
    if dropped:
        turns = "turn was" if dropped == 1 else "turns were"
        notice = f"The {dropped} oldest {turns} left out to fit the model's context window."
        lost = sum(map(len, image.by_turn[:dropped])) if isinstance(image, ConversationImages) else 0
        if lost:
            images = "1 image" if lost == 1 else f"{lost} images"
            notice = notice[:-1] + f", and {images} with {'it' if dropped == 1 else 'them'}."
    return _replies(loaded, inputs, settings, engine, notice)


def _kept_images(
    image: Image.Image | ConversationImages, dropped: int, turns: int
) -> list[tuple[Image.Image, ...]]:
    """Each remaining user turn's images once the `dropped` oldest turns are left out."""
    if not isinstance(image, ConversationImages):
        return [(image,)] + [()] * (turns - dropped - 1)
    if len(image.by_turn) != turns:
        raise ValueError(f"images are given for {len(image.by_turn)} user turns, but there are {turns}")
    return list(image.by_turn[dropped:])


@dataclass(frozen=True)
class ImagePrefill:
    """How a vision model decodes (in an engine or stream_generate): the image goes in with the first
    forward pass only."""

    prompt_ids: list[int]  # what the reply continues (an encoder-decoder's: just the start token)
    prefill: Callable[[], Any]  # the first forward pass, image included; returns logits + KV cache
    decode_model: Callable[..., Any]  # each later single-token step


def engine_model(loaded: LoadedVision) -> torch.nn.Module | None:
    """The causal LM a batching engine decodes for this model (LLaVA itself, a decoder-only BLIP-2's
    language model); None for Flan-T5 BLIP-2, whose decoder steps need the encoder's output."""
    if loaded.family in LLAVA_FAMILIES:
        return loaded.model
    return loaded.model.language_model if loaded.model.config.use_decoder_only_language_model else None


def image_prefill(loaded: LoadedVision, inputs: dict) -> ImagePrefill:
    model = loaded.model
    prompt_ids = inputs["input_ids"][0].tolist()
    decoder = engine_model(loaded)
    if loaded.family in LLAVA_FAMILIES:

        @torch.inference_mode()
        def prefill():  # logits_to_keep: the prompt's logits would cost tokens x vocab floats
            return model(**inputs, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)

        return ImagePrefill(prompt_ids, prefill, decoder)
    if decoder is not None:
        return ImagePrefill(prompt_ids, _blip_prefill(model, inputs), decoder)
    prefill, step = _blip_seq2seq_steps(model, inputs)
    return ImagePrefill([model.language_model.config.decoder_start_token_id], prefill, step)


def _replies(
    loaded: LoadedVision,
    inputs: dict,
    settings: GenerationSettings,
    engine: Engine | None,
    notice: str | None,
) -> Iterator[Reply]:
    seed_holds = True  # alone, a request's shapes are its own; in the engine, as the engine says
    if settings.mode == "beam":
        updates, end = _beam_updates(loaded, inputs, settings), None
    else:
        plan = image_prefill(loaded, inputs)
        if engine is not None:  # submitted now: a full queue refuses before anything is shown
            handle = engine.submit(plan.prompt_ids, settings, prefill=plan.prefill)
            updates, end, seed_holds = iter(handle), handle.cancel, engine.seed_holds
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
    replies = replies_from_updates(updates, settings, notice, prompt_size(inputs), seed_holds=seed_holds)
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
