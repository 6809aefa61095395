"""Chat & caption playground: wires the backend to the UI and the OpenAI-compatible API, and serves both.

    python app.py                      # Vicuna-7B 4-bit on GPU, a small chat model on CPU
    python app.py --model DIR_OR_HUB_ID --quantization 4bit --port 7860
    python app.py --backend-url http://gpu-box:8000   # an OpenAI-compatible server answers instead
    python app.py --help               # every flag, each also an environment variable

When a model cannot be had (offline, not cached), it starts on the built-in demo models.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import gradio as gr
import torch
import uvicorn
from fastapi import FastAPI

from backend.allocator import AllocatorKeeper, AllocatorPolicy
from backend.config import AppConfig, parse_config
from backend.decode.batch_cache import deterministic_kernels
from backend.decode.engine import EngineLimits
from backend.images import ImageLimits
from backend.metrics import Metrics
from backend.models.demo_text import default_cache_root
from backend.models.demo_vision import DEMO_LLAVA
from backend.models.holder import ModelHolder, plan_switches_together
from backend.models.hub import ModelUnavailable
from backend.models.loading import ModelSpec, plan_report, with_joint_plan
from backend.models.row_kernels import KernelBuild
from backend.models.vision_loading import load_vision_model
from backend.openai_server.probes import build_probe_router
from backend.openai_server.routes import build_openai_router
from backend.remote.client import OpenAIClient
from backend.remote.service import RemoteChatService, RemoteHolder, RemoteVisionService
from backend.request_stats import RequestStats
from backend.services.chat import ChatService
from backend.services.prompt_log import LoggedChat, LoggedVision
from backend.services.rate_limit import rate_limit_for
from backend.services.vision import VisionService
from backend.torch_threads import call_on_fresh_thread
from ui.layout import CSS, TITLE, build_ui

log = logging.getLogger("playground")
# No usage telemetry to Gradio; it reads this whenever a Blocks is built, so before build_ui runs.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def model_spec(
    config: AppConfig, name: str, quantization: str, kernel_build: KernelBuild | None = None
) -> ModelSpec:
    return ModelSpec(
        name=name, quantization=quantization, kernel_build=kernel_build, **asdict(config.placement)
    )


def load_all(holders: dict[str, ModelHolder]) -> None:
    """Plan all models together, then load them one after the other: two loads at once would fight
    over memory bandwidth and cores, and planning together keeps them from claiming the same room."""
    planned = with_joint_plan({role: holder.spec for role, holder in holders.items()})
    for role, holder in holders.items():
        holder.spec = planned[role]
        holder.load()


@dataclass
class Services:
    """The engine the UI and the /v1 API share: local models, or a remote OpenAI-compatible server."""

    chat: object  # ChatService or RemoteChatService
    images: object | None  # VisionService or RemoteVisionService; None when images are off
    holders: list
    model_name: str | Callable[[], str]  # the id /v1 serves
    unsupported: dict[str, str]  # settings the engine does not take, and why (the UI disables them)
    api_extensions: frozenset[str] | None = None  # non-OpenAI /v1 parameters; None: all of ours
    rate_limit: object | None = None  # a ClientRateLimit the UI, its API and /v1 share; None: no limit
    metrics: Metrics | None = None  # what GET /metrics serves
    images_off: str | None = None  # why images are off, where a backend server takes none (the UI says it)


def image_limits(config: AppConfig) -> ImageLimits:
    return ImageLimits(
        max_bytes=config.server.max_upload_mb * 2**20, max_pixels=config.server.max_image_pixels
    )


def create_services(config: AppConfig, load_in_background: bool = True) -> Services:
    metrics = Metrics()
    stats = RequestStats(observer=metrics)  # every reply the chat service streams, UI and /v1 alike
    if config.remote.url:
        services = remote_services(config, stats)
    else:
        chat, images, holders = local_services(config, load_in_background, stats)
        services = Services(chat, images, holders, lambda: chat.holder.spec.name, {})  # follows switches
    chat = services.chat
    metrics.watch(services.model_name, lambda: (*chat.queue_stats(), chat.kv_usage()))
    services.metrics = metrics
    services.rate_limit = rate_limit_for(config.server.rate_limit, config.server.trust_proxy_headers)
    if config.server.log_prompts:  # the one place prompts and replies are logged, for the UI and /v1 alike
        services.chat = LoggedChat(services.chat)
        services.images = LoggedVision(services.images) if services.images is not None else None
    return services


def local_services(config: AppConfig, load_in_background: bool, stats: RequestStats):
    """ChatService and VisionService on models loaded here (in the background while the page is served)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    # Built (or loaded from its cache) while the models load; they move to it when ready.
    placement = config.placement
    build = KernelBuild(default_cache_root() / "kernels", placement.packed_weights and placement.row_kernels)
    build.start()
    text_spec = replace(
        model_spec(config, config.model, config.quantization, build), adapters=config.adapters
    )
    text = ModelHolder(text_spec, config.demo_fallback, choices=config.model_choices)
    roles = {"text": text}
    vision = None
    if config.vision_model:
        vision_spec = model_spec(config, config.vision_model, config.vision_quantization, build)
        vision = ModelHolder(
            vision_spec,
            config.demo_fallback,
            loader=load_vision_model,
            demo_name=DEMO_LLAVA,
            choices=config.vision_model_choices,
        )
        roles["vision"] = vision
    plan_switches_together(roles)
    holders = list(roles.values())
    if load_in_background:
        threading.Thread(target=load_all, args=(roles,), name="model-loader", daemon=True).start()
    else:  # still on a thread that ends: see backend.torch_threads
        call_on_fresh_thread(load_all, roles, name="model-loader")
    engine_limits = EngineLimits(
        config.placement.max_batch_size,
        config.server.max_waiting,
        batch_invariant=config.server.batch_invariant,
        fused_decode=config.server.fused_decode,
    )
    chat = ChatService(text, config.limits, engine_limits, stats)
    images = (
        VisionService(vision, chat, config.limits, image_limits(config), engine_limits) if vision else None
    )
    return chat, images, holders


def remote_services(config: AppConfig, stats: RequestStats) -> Services:
    holder = RemoteHolder(OpenAIClient(config.remote.url, config.remote.api_key), config.model)
    status = holder.load()  # one quick request: the controls depend on what the server takes
    if status.state != "ready":
        log.warning("%s; generation settings are limited to standard OpenAI ones until restart", status.stage)
    capabilities = holder.capabilities
    chat = RemoteChatService(holder, config.limits, stats)
    images = None
    if config.vision_model and capabilities.takes_images:
        images = RemoteVisionService(chat, config.limits, image_limits(config))
    return Services(
        chat,
        images,
        [holder],
        lambda: holder.loaded_name,
        capabilities.unsupported(),
        capabilities.api_extensions(images=images is not None),
        images_off=capabilities.images_off_reason() if config.vision_model else None,
    )


def create_app(config: AppConfig, load_in_background: bool = True):
    """The Gradio app for `config` and its model holders; models load in the background meanwhile."""
    services = create_services(config, load_in_background)
    return build_demo(config, services), services.holders


def build_demo(config: AppConfig, services: Services) -> gr.Blocks:
    demo = build_ui(
        services.chat,
        services.images,
        config.limits,
        config.server.concurrency,
        services.unsupported,
        rate_limit=services.rate_limit,
        images_off=services.images_off,
    )
    return demo.queue(max_size=config.server.queue_size, default_concurrency_limit=config.server.concurrency)


def create_server(config: AppConfig, load_in_background: bool = True):
    """(FastAPI app, Gradio app, holders): /v1 and the UI on one port, one engine behind both."""
    services = create_services(config, load_in_background)
    demo = build_demo(config, services)
    app = FastAPI(title=TITLE, docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(build_probe_router(services.chat, services.metrics))
    app.include_router(
        build_openai_router(
            services.chat,
            services.images,
            config.server.api_key,
            services.model_name,
            config.limits,
            services.api_extensions,
            rate_limit=services.rate_limit,
        )
    )
    gr.mount_gradio_app(
        app,
        demo,
        path="/",
        server_name=config.server.host,
        server_port=config.server.port,
        css=CSS,
        show_error=True,
        max_file_size=f"{config.server.max_upload_mb}mb",
    )
    return app, demo, services.holders


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # int8 on CPU warns on every call
    config = parse_config(argv, has_gpu=torch.cuda.is_available())
    # Before the server's threads start: memory stays flat for days (backend.allocator).
    AllocatorKeeper(AllocatorPolicy(trim_seconds=config.server.malloc_trim_seconds or None)).start()
    if config.server.batch_invariant:
        deterministic_kernels()
    if config.plan:  # where the models would go, planned from their configs alone: no weights are loaded
        specs = {"text": model_spec(config, config.model, config.quantization)}
        if config.vision_model:
            specs["vision"] = model_spec(config, config.vision_model, config.vision_quantization)
        try:
            print(plan_report(specs, as_json=config.plan_json))
        except ModelUnavailable as error:
            sys.exit(f"Cannot plan: {error}")
        return
    log.info(
        "Starting with model %s (%s), vision model %s", config.model, config.quantization, config.vision_model
    )
    app, _, _ = create_server(config)
    log.info(
        "Serving on http://%s:%d (OpenAI-compatible API under /v1)", config.server.host, config.server.port
    )
    # A stopped Space must stop: clients that keep connections open may not hold the shutdown forever.
    server = config.server
    uvicorn.run(app, host=server.host, port=server.port, log_level="warning", timeout_graceful_shutdown=10)


if __name__ == "__main__":
    main(sys.argv[1:])
