"""Chat & caption playground: wires the backend to the UI and launches it.

    python app.py                      # Vicuna-7B 4-bit on GPU, a small chat model on CPU
    python app.py --model DIR_OR_HUB_ID --quantization 4bit --port 7860
    python app.py --help               # every flag, each also an environment variable

When a model cannot be had (offline, not cached), it starts on the built-in demo models.
"""

from __future__ import annotations

import logging
import sys
import threading

import torch

from backend.app_config import AppConfig, parse_config
from backend.chat_service import ChatService
from backend.engine import EngineLimits
from backend.images import ImageLimits
from backend.loading import ModelSpec
from backend.model_holder import ModelHolder
from backend.vision import load_vision_model
from backend.vision_demo import DEMO_LLAVA
from backend.vision_service import VisionService
from ui.layout import CSS, build_ui

log = logging.getLogger("playground")


def model_spec(config: AppConfig, name: str, quantization: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        quantization=quantization,
        dtype=config.dtype,
        gpu_memory=config.gpu_memory,
        cpu_memory=config.cpu_memory,
        context_length=config.context_length,
        max_batch_size=config.max_batch_size,
    )


def load_all(holders: list[ModelHolder]) -> None:
    """One after the other: two loads at once would fight over memory bandwidth and cores."""
    for holder in holders:
        holder.load()


def create_app(config: AppConfig, load_in_background: bool = True):
    """The Gradio app for `config`; models load in the background while the page is served."""
    if config.threads:
        torch.set_num_threads(config.threads)
    text = ModelHolder(model_spec(config, config.model, config.quantization), config.demo_fallback)
    holders = [text]
    vision = None
    if config.vision_model:
        vision_spec = model_spec(config, config.vision_model, config.vision_quantization)
        vision = ModelHolder(
            vision_spec, config.demo_fallback, loader=load_vision_model, demo_name=DEMO_LLAVA
        )
        holders.append(vision)
    if load_in_background:
        threading.Thread(target=load_all, args=(holders,), name="model-loader", daemon=True).start()
    else:
        load_all(holders)
    chat = ChatService(text, config.limits, EngineLimits(config.max_batch_size, config.max_waiting))
    image_limits = ImageLimits(max_bytes=config.max_upload_mb * 2**20, max_pixels=config.max_image_pixels)
    images = VisionService(vision, chat, config.limits, image_limits) if vision else None
    demo = build_ui(chat, images, config.limits, config.concurrency)
    return demo.queue(max_size=config.queue_size, default_concurrency_limit=config.concurrency), holders


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # int8 on CPU warns on every call
    config = parse_config(argv, has_gpu=torch.cuda.is_available())
    log.info(
        "Starting with model %s (%s), vision model %s", config.model, config.quantization, config.vision_model
    )
    demo, _ = create_app(config)
    demo.launch(
        server_name=config.host,
        server_port=config.port,
        css=CSS,
        share=False,
        show_error=True,
        max_file_size=f"{config.max_upload_mb}mb",
    )


if __name__ == "__main__":
    main(sys.argv[1:])
