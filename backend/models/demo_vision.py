"""Offline "demo" vision models: tiny random BLIP-2, InstructBLIP and LLaVA, built locally, deterministically.

Like the text demo (``backend.models.demo_text``) they exist so the captioning path runs end to end with no
network: each is a real Hugging Face directory (safetensors, processor, tokenizer with the ``<image>``
special token) loadable with ``AutoProcessor`` / ``AutoModelForImageTextToText``. Captions are noise.

Every Linear layer has an input size that is a multiple of 64, so bitsandbytes 4-bit works on the CPU.
The tokenizer is the text demo's byte-level BPE plus ``<image>`` (id 1000); embedding matrices are
padded to 1024 rows, and ``mask_unknown_tokens`` (decode.sampling) keeps the 23 padded ids out of replies.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from backend.models.demo_text import (
    MARKER_FILE,
    _build_tokenizer,
    default_cache_root,
    install_atomically,
)

DEMO_BLIP2 = "demo:tiny-blip2"
DEMO_INSTRUCTBLIP = "demo:tiny-instructblip"
DEMO_LLAVA = "demo:tiny-llava"
DEMO_VISION_MODELS = (DEMO_BLIP2, DEMO_INSTRUCTBLIP, DEMO_LLAVA)
_VERSION = 1
_SEED = 20240612
IMAGE_TOKEN = "<image>"
IMAGE_SIZE, PATCH_SIZE = 32, 8
NUM_QUERY_TOKENS = 8
_HIDDEN, _INTERMEDIATE = 64, 128
_MAX_POSITIONS = 512
# Q-Former cross-attention this strong makes the image move the logits as much as the query tokens do.
_QFORMER_INIT = 0.1

# Vicuna-like, as llava-hf's LLaVA-1.5 template: images first in a user turn, "<image>\n" each.
# Content may be a string or a list of {"type": "image"} / {"type": "text", "text": ...} parts.
# Newlines sit inside {{ }}: chat templates render with trim_blocks, which eats one after a {% %} tag.
# No bos_token: the processor's tokenizer adds BOS, as with llava-hf checkpoints.
LLAVA_CHAT_TEMPLATE = (
    "{% macro text(content) %}"
    "{% if content is string %}{{ content }}"
    "{% else %}{% for part in content if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{% endif %}"
    "{% endmacro %}"
    "{% macro images(content) %}"
    "{% if content is not string %}"
    "{% for part in content if part['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
    "{% endif %}"
    "{% endmacro %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ text(message['content']) + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'USER: ' + images(message['content']) }}"
    "{{ text(message['content']) + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ 'ASSISTANT: ' + text(message['content']) + eos_token + '\\n' }}"
    "{% else %}{{ raise_exception('Unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

logger = logging.getLogger("backend.models.demo_vision")


def _tokenizer(chat_template: str | None):
    """The text demo's tokenizer plus ``<image>`` as an added special token."""
    from tokenizers import AddedToken

    tokenizer = _build_tokenizer()
    # Not a named `image_token` (extra_special_tokens): Blip2Processor 5.23 then crashes on a str token.
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    tokenizer.chat_template = chat_template
    return tokenizer


def _padded_vocab(tokenizer) -> int:
    return -(-len(tokenizer) // 64) * 64


def _special_ids(tokenizer) -> dict[str, int]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _llama_config(tokenizer) -> dict:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=_padded_vocab(tokenizer),
        hidden_size=_HIDDEN,
        intermediate_size=_INTERMEDIATE,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=_MAX_POSITIONS,
        tie_word_embeddings=False,
        **_special_ids(tokenizer),
    ).to_dict()


def _opt_config(tokenizer) -> dict:
    from transformers import OPTConfig

    return OPTConfig(
        vocab_size=_padded_vocab(tokenizer),
        hidden_size=_HIDDEN,
        word_embed_proj_dim=_HIDDEN,
        ffn_dim=_INTERMEDIATE,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_MAX_POSITIONS,
        tie_word_embeddings=False,
        **_special_ids(tokenizer),
    ).to_dict()


def _tower(**extra) -> dict:
    """Vision encoder (BLIP ViT or CLIP) and Q-Former share this tiny shape."""
    return {
        # BLIP's vision config defaults to 1e-10: random patch embeddings would all but ignore the pixels.
        "initializer_range": 0.02,
        "hidden_size": _HIDDEN,
        "intermediate_size": _INTERMEDIATE,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    } | extra


def _instantiate(model_class, config, tokenizer):
    import torch

    # fork_rng restores the caller's CPU RNG; seeding only the CPU generator leaves CUDA RNGs alone.
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.default_generator.manual_seed(_SEED)
        model = model_class(config).to(torch.float32).eval()
        if hasattr(model, "query_tokens"):
            # Trained query tokens differ; all-zero ones (the init) would give identical features.
            torch.nn.init.normal_(model.query_tokens, std=config.initializer_range)
    for key, value in _special_ids(tokenizer).items():
        setattr(model.generation_config, key, value)
    return model


def _build_blip2(target_dir: Path) -> None:
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessorPil

    tokenizer = _tokenizer(None)
    config = Blip2Config(
        vision_config=_tower(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE),
        qformer_config=_tower(encoder_hidden_size=_HIDDEN, vocab_size=64, initializer_range=_QFORMER_INIT),
        text_config=_opt_config(tokenizer),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    model = _instantiate(Blip2ForConditionalGeneration, config, tokenizer)
    image_processor = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    # Without num_query_tokens the processor writes no image tokens and the image is silently ignored.
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=NUM_QUERY_TOKENS)
    model.save_pretrained(target_dir, safe_serialization=True)
    processor.save_pretrained(target_dir)


def _build_instructblip(target_dir: Path) -> None:
    from transformers import (
        BlipImageProcessorPil,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
    )

    tokenizer = _tokenizer(None)
    # Real checkpoints use BERT's; any tokenizer whose ids the Q-Former can embed will do.
    qformer_tokenizer = _build_tokenizer()
    qformer_tokenizer.chat_template = None
    config = InstructBlipConfig(
        vision_config=_tower(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE),
        qformer_config=_tower(
            encoder_hidden_size=_HIDDEN,
            initializer_range=_QFORMER_INIT,
            vocab_size=_padded_vocab(qformer_tokenizer),
            pad_token_id=qformer_tokenizer.pad_token_id,
        ),
        text_config=_llama_config(tokenizer),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    model = _instantiate(InstructBlipForConditionalGeneration, config, tokenizer)
    image_processor = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = InstructBlipProcessor(
        image_processor, tokenizer, qformer_tokenizer, num_query_tokens=NUM_QUERY_TOKENS
    )
    model.save_pretrained(target_dir, safe_serialization=True)
    processor.save_pretrained(target_dir)


def _build_llava(target_dir: Path) -> None:
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    # The tokenizer gets the same template, so both saves write one identical chat_template.jinja.
    tokenizer = _tokenizer(LLAVA_CHAT_TEMPLATE)
    patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
    config = LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            **_tower(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=_HIDDEN),
        },
        text_config=_llama_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",  # drop CLS: 16 patch features per image
        vision_feature_layer=-2,
        image_seq_length=patches,
        tie_word_embeddings=False,
    )
    model = _instantiate(LlavaForConditionalGeneration, config, tokenizer)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, removed again by the "default" strategy
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    model.save_pretrained(target_dir, safe_serialization=True)
    processor.save_pretrained(target_dir)


_BUILDERS: dict[str, Callable[[Path], None]] = {
    DEMO_BLIP2: _build_blip2,
    DEMO_INSTRUCTBLIP: _build_instructblip,
    DEMO_LLAVA: _build_llava,
}


def _check_name(name: str) -> None:
    if name not in _BUILDERS:
        raise ValueError(f"unknown demo vision model {name!r}; choose one of {', '.join(DEMO_VISION_MODELS)}")


def build_demo_vision_model(name: str, target_dir: Path) -> Path:
    """Build demo vision model `name` into `target_dir` (HF format, safetensors). Deterministic."""
    _check_name(name)
    target_dir = Path(target_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    logger.info("Building demo vision model %s into %s", name, target_dir)
    _BUILDERS[name](target_dir)
    marker = {"demo": True, "kind": "vision", "name": name, "version": _VERSION}
    # Written last: its presence means the directory is complete.
    (target_dir / MARKER_FILE).write_text(json.dumps(marker) + "\n", encoding="utf-8")
    return target_dir


def demo_vision_model_dir(name: str, cache_root: Path | None = None) -> Path:
    """Return the cached directory of demo vision model `name`, building it (atomically) on first use."""
    _check_name(name)
    root = Path(cache_root if cache_root is not None else default_cache_root())
    target = root / "demo" / f"{name.removeprefix('demo:')}-v{_VERSION}"
    return install_atomically(target, lambda folder: build_demo_vision_model(name, folder))
