"""Chat & caption playground: wires the backend to the UI and launches it.

    python app.py                      # Vicuna-7B 4-bit on GPU, a small chat model on CPU
    python app.py --model DIR_OR_HUB_ID --quantization 4bit --port 7860
    python app.py --help               # every flag, each also an environment variable

When the model cannot be had (offline, not cached), it starts on the built-in demo model.
"""

from __future__ import annotations

import logging
import sys

import torch

from backend.app_config import AppConfig, parse_config
from backend.chat_service import ChatService
from backend.loading import ModelSpec
from backend.model_holder import ModelHolder
from ui.layout import CSS, build_ui

log = logging.getLogger("playground")


def create_app(config: AppConfig, load_in_background: bool = True):
    """The Gradio app for `config`; the model loads in the background while the page is served."""
    if config.threads:
        torch.set_num_threads(config.threads)
    spec = ModelSpec(
        name=config.model,
        quantization=config.quantization,
        dtype=config.dtype,
        gpu_memory=config.gpu_memory,
        cpu_memory=config.cpu_memory,
        context_length=config.context_length,
        max_batch_size=config.concurrency,
    )
    holder = ModelHolder(spec, fallback_to_demo=config.demo_fallback)
    if load_in_background:
        holder.start()
    else:
        holder.load()
    demo = build_ui(ChatService(holder, config.limits), config.limits, config.concurrency)
    return demo.queue(max_size=config.queue_size, default_concurrency_limit=config.concurrency), holder


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # int8 on CPU warns on every call
    config = parse_config(argv, has_gpu=torch.cuda.is_available())
    log.info("Starting with model %s (%s)", config.model, config.quantization)
    demo, _ = create_app(config)
    demo.launch(server_name=config.host, server_port=config.port, css=CSS, share=False, show_error=True)


if __name__ == "__main__":
    main(sys.argv[1:])
