"""The app's configuration as typed records, read from the flags (backend.flags) and checked once."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from backend.flags import (
    CPU_DEFAULT,
    CPU_VISION_DEFAULT,
    GPU_DEFAULT,
    GPU_VISION_DEFAULT,
    NO_VISION,
    build_parser,
)
from backend.models.adapters import AdapterSpec, parse_adapters
from backend.placement.budgets import InvalidMemorySpec, parse_gpu_memory, parse_size
from backend.settings import ServerLimits


@dataclass(frozen=True)
class Placement:
    """How each model is placed and loaded: ModelSpec takes these fields as they are (app.model_spec)."""

    dtype: str  # auto | float32 | bfloat16 | float16
    gpu_memory: str | None  # "0=20GiB,1=10GiB"; None: 90% of each visible GPU's free memory
    cpu_memory: str | None  # None: 80% of the available RAM
    context_length: int | None  # what one request may reach; None: the model's window
    max_batch_size: int  # requests decoded together; the KV pool is capped at this many
    trust_remote_code: bool = False  # let model repositories run their own Python code
    packed_weights: bool = True  # CPU linears: oneDNN on weights packed once (models.packed_weights)
    row_kernels: bool = True  # AVX-512 CPUs: our own kernels on the packed weights (models.row_kernels)


@dataclass(frozen=True)
class ServerConfig:
    """How the app serves: the port, Gradio's queue, /v1's key, limits per client, what is logged."""

    host: str
    port: int
    concurrency: int  # Gradio events running at once: the engine's batch plus its waiting line
    queue_size: int
    max_waiting: int  # requests waiting for a place in the batch
    max_image_pixels: int
    max_upload_mb: int
    api_key: str | None = None  # required on every /v1 request when set
    rate_limit: int = 0  # generation requests per minute per client; 0: no limit
    trust_proxy_headers: bool = False  # take the client from X-Forwarded-For (behind a Space's proxy)
    log_prompts: bool = False  # log every prompt and reply at INFO
    batch_invariant: bool = True  # a seed gives the same text alone or batched (decode steps padded)
    fused_decode: bool = True  # the engine's own decode step where the model allows (decode.fused_step)
    malloc_trim_seconds: float = 30.0  # backend.allocator hands freed memory back this often; 0: never


@dataclass(frozen=True)
class RemoteEngine:
    """--backend-url: an OpenAI-compatible server answers instead of local models."""

    url: str | None = None
    api_key: str | None = None


@dataclass(frozen=True)
class AppConfig:
    model: str
    quantization: str
    vision_model: str | None  # None: no image features
    vision_quantization: str
    placement: Placement
    server: ServerConfig
    limits: ServerLimits
    demo_fallback: bool
    threads: int | None
    remote: RemoteEngine = RemoteEngine()
    plan: bool = False  # print the device plan and exit, loading no weights
    plan_json: bool = False  # ... as JSON
    adapters: tuple[AdapterSpec, ...] = ()  # --lora: LoRA adapters on the chat model, chosen per request
    model_choices: tuple[str, ...] = ()  # chat models the System tab may switch to (the launched one first)
    vision_model_choices: tuple[str, ...] = ()  # the same for the vision model


def default_model(has_gpu: bool) -> tuple[str, str]:
    """Vicuna-7B in 4-bit where a GPU is visible; a small chat model a CPU can run otherwise."""
    return GPU_DEFAULT if has_gpu else CPU_DEFAULT


def check_values(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse leaves unchecked (defaults from PLAYGROUND_* variables, memory sizes): argparse's
    one-line error and exit code 2, never a traceback."""
    for action in parser._actions:  # argparse checks choices on the command line, not on env defaults
        value = getattr(args, action.dest, None)
        if action.choices is not None and value is not None and value not in action.choices:
            parser.error(
                f"{'/'.join(action.option_strings)}: invalid choice {value!r} (choose from "
                f"{', '.join(map(str, action.choices))})"
            )
    trim = args.malloc_trim_seconds
    if not 0 <= trim < float("inf"):
        parser.error(f"--malloc-trim-seconds: must be 0 (off) or a number of seconds, got {trim}")
    try:
        parse_gpu_memory(args.gpu_memory)
    except InvalidMemorySpec as error:
        parser.error(f"--gpu-memory: {error}")
    try:
        if args.cpu_memory:
            parse_size(args.cpu_memory)
    except InvalidMemorySpec as error:
        parser.error(f"--cpu-memory: {error}")


def comma_list(text: str | None) -> list[str]:
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def choices_with(launched: str | None, listed: str) -> tuple[str, ...]:
    """The allowlist a model may be switched within: the launched model first, no repeats."""
    return tuple(dict.fromkeys([launched, *comma_list(listed)])) if launched else ()


def parse_config(
    argv: Sequence[str] | None, has_gpu: bool, env: Mapping[str, str] | None = None
) -> AppConfig:
    env = os.environ if env is None else env
    parser = build_parser(env)
    args = parser.parse_args(argv)
    check_values(parser, args)
    try:
        adapters = parse_adapters(comma_list(env.get("PLAYGROUND_LORA")) if args.lora is None else args.lora)
    except ValueError as error:
        parser.error(f"--lora: {error}")
    preset_model, preset_quantization = default_model(has_gpu)
    model = args.model or preset_model
    quantization = args.quantization or (preset_quantization if model == preset_model else "none")
    preset_vision, preset_vision_quantization = GPU_VISION_DEFAULT if has_gpu else CPU_VISION_DEFAULT
    vision = args.vision_model or preset_vision
    vision_quantization = args.vision_quantization or (
        preset_vision_quantization if vision == preset_vision else "none"
    )
    return AppConfig(
        model=model,
        quantization=quantization,
        vision_model=None if vision == NO_VISION else vision,
        vision_quantization=vision_quantization,
        placement=Placement(
            dtype=args.dtype,
            gpu_memory=args.gpu_memory,
            cpu_memory=args.cpu_memory,
            context_length=int(args.context_length) if args.context_length else None,
            max_batch_size=args.max_batch_size,
            trust_remote_code=args.trust_remote_code,
            packed_weights=not args.no_packed_weights,
            row_kernels=not args.no_row_kernels,
        ),
        server=ServerConfig(
            host=args.host,
            port=args.port,
            concurrency=args.max_batch_size + args.max_waiting,
            queue_size=args.queue_size,
            max_waiting=args.max_waiting,
            max_image_pixels=args.max_image_pixels,
            max_upload_mb=args.max_upload_mb,
            api_key=args.api_key or None,
            rate_limit=max(args.rate_limit, 0),
            trust_proxy_headers=args.trust_proxy_headers,
            log_prompts=args.log_prompts,
            batch_invariant=not args.no_batch_invariance,
            fused_decode=not args.no_fused_decode,
            malloc_trim_seconds=args.malloc_trim_seconds,
        ),
        limits=ServerLimits(max_new_tokens=args.max_new_tokens_limit, max_input_chars=args.max_input_chars),
        demo_fallback=not args.no_demo_fallback,
        threads=int(args.threads) if args.threads else None,
        remote=RemoteEngine(url=args.backend_url or None, api_key=args.backend_api_key or None),
        plan=args.plan or args.plan_json,
        plan_json=args.plan_json,
        adapters=adapters,
        model_choices=choices_with(model, args.model_choices),
        vision_model_choices=choices_with(None if vision == NO_VISION else vision, args.vision_model_choices),
    )
