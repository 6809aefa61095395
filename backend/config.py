"""Command-line flags, each also settable by an environment variable (for a Space)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from backend.models.adapters import AdapterSpec, parse_adapters
from backend.placement.budgets import InvalidMemorySpec, parse_gpu_memory, parse_size
from backend.settings import ServerLimits

GPU_DEFAULT = ("lmsys/vicuna-7b-v1.5", "4bit")
CPU_DEFAULT = ("HuggingFaceTB/SmolLM2-360M-Instruct", "none")
GPU_VISION_DEFAULT = ("Salesforce/blip2-opt-2.7b", "4bit")
CPU_VISION_DEFAULT = ("llava-hf/llava-interleave-qwen-0.5b-hf", "none")
NO_VISION = "none"


@dataclass(frozen=True)
class Placement:
    """How each model is placed and loaded: ModelSpec takes these fields as they are (app.model_spec)."""

    dtype: str  # auto | float32 | bfloat16 | float16
    gpu_memory: str | None  # "0=20GiB,1=10GiB"; None: 90% of each visible GPU's free memory
    cpu_memory: str | None  # None: 80% of the available RAM
    context_length: int | None  # what one request may reach; None: the model's window
    max_batch_size: int  # requests decoded together; the KV pool is capped at this many
    trust_remote_code: bool = False  # let model repositories run their own Python code


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


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    def opt(name: str, fallback=None):
        return env.get(f"PLAYGROUND_{name}", fallback)

    def switch(name: str) -> bool:
        return opt(name, "").strip().lower() in ("1", "true", "yes")

    parser = argparse.ArgumentParser(
        description="Chat & caption playground. Every flag can also be set as PLAYGROUND_<FLAG> "
        "(e.g. PLAYGROUND_MODEL, PLAYGROUND_PORT).",
    )
    add = parser.add_argument
    add(
        "--model",
        default=opt("MODEL"),
        help="Hub id (org/name) or local Hugging Face model directory; "
        "'demo:tiny-llama-chat' for the built-in demo. Default: Vicuna-7B v1.5 4-bit on GPU, "
        f"{CPU_DEFAULT[0]} on CPU.",
    )
    add(
        "--quantization",
        choices=["none", "8bit", "4bit"],
        default=opt("QUANTIZATION"),
        help="bitsandbytes weight quantization (works on CPU too). Default: the preset's.",
    )
    add(
        "--vision-model",
        default=opt("VISION_MODEL"),
        help="Captioning / visual chat model: BLIP-2, InstructBLIP or LLaVA (Hub id or local directory; "
        "the family is read from its config); 'demo:tiny-llava' or 'demo:tiny-blip2' for the built-in "
        f"demos; '{NO_VISION}' turns images off. Default: {GPU_VISION_DEFAULT[0]} 4-bit on GPU, "
        f"{CPU_VISION_DEFAULT[0]} on CPU.",
    )
    add(
        "--vision-quantization",
        choices=["none", "8bit", "4bit"],
        default=opt("VISION_QUANTIZATION"),
        help="bitsandbytes quantization of the vision model. Default: the preset's.",
    )
    add(
        "--max-image-pixels",
        type=int,
        default=opt("MAX_IMAGE_PIXELS", "50000000"),
        help="Images with more pixels are refused before decoding (decompression bombs).",
    )
    add(
        "--max-upload-mb",
        type=int,
        default=opt("MAX_UPLOAD_MB", "20"),
        help="Largest upload accepted, in MiB (Gradio refuses larger files).",
    )
    add(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default=opt("DTYPE", "auto"),
        help="Compute dtype. auto: bf16/fp16 on GPU; bf16 on CPUs with bf16 instructions, else fp32.",
    )
    add(
        "--gpu-memory",
        default=opt("GPU_MEMORY"),
        help="Per-GPU budgets like 0=20GiB,1=10GiB. Default: 90%% of each visible GPU's free memory.",
    )
    add("--cpu-memory", default=opt("CPU_MEMORY"), help="RAM budget for offloaded layers, e.g. 32GiB.")
    add(
        "--context-length",
        type=int,
        default=opt("CONTEXT_LENGTH"),
        help="Context length the KV-cache headroom is planned for. Default: the model's window.",
    )
    add(
        "--plan",
        action="store_true",
        help="Print where the models would go (GPUs, CPU RAM, disk) and exit, from their configs alone: "
        "no weights are loaded, and --gpu-memory may describe GPUs this machine does not have.",
    )
    add("--json", dest="plan_json", action="store_true", help="Print the plan as JSON (implies --plan).")
    add(
        "--host",
        default=opt("HOST", env.get("GRADIO_SERVER_NAME", "127.0.0.1")),  # a Space sets GRADIO_SERVER_NAME
        help="Address to listen on (0.0.0.0 for all).",
    )
    add("--port", type=int, default=opt("PORT", env.get("GRADIO_SERVER_PORT", "7860")), help="Port.")
    add(
        "--max-batch-size",
        type=int,
        default=opt("MAX_BATCH_SIZE", "8"),
        help="Replies decoded together in one batch by the engine (KV-cache room is planned for it).",
    )
    add(
        "--no-batch-invariance",
        action="store_true",
        default=switch("NO_BATCH_INVARIANCE"),
        help="Decode only the rows in use instead of padding every step to --max-batch-size: faster for one "
        "user, but a seed may then give other text when others are served at once (see docs/serving.md).",
    )
    add(
        "--max-waiting",
        type=int,
        default=opt("MAX_WAITING", "16"),
        help="Requests waiting for a place in the batch; beyond it API callers are told the server is busy.",
    )
    add(
        "--queue-size",
        type=int,
        default=opt("QUEUE_SIZE", "64"),
        help="Browser requests Gradio's queue holds beyond those; more are told the queue is full.",
    )
    add(
        "--max-new-tokens-limit",
        type=int,
        default=opt("MAX_NEW_TOKENS_LIMIT", "1024"),
        help="Upper bound for max_new_tokens that any request may ask for.",
    )
    add(
        "--max-input-chars",
        type=int,
        default=opt("MAX_INPUT_CHARS", "20000"),
        help="Longest message or completion text accepted, in characters.",
    )
    add(
        "--no-demo-fallback",
        action="store_true",
        default=opt("NO_DEMO_FALLBACK", "") in ("1", "true"),
        help="Fail instead of starting on the demo model when the configured model cannot be loaded.",
    )
    add("--threads", type=int, default=opt("THREADS"), help="torch CPU threads. Default: torch's choice.")
    add(
        "--api-key",
        default=opt("API_KEY"),
        help="Require this key (Authorization: Bearer KEY) on every request to the OpenAI-compatible /v1 API "
        "(prefer the environment variable: flags show in process lists).",
    )
    add(
        "--backend-url",
        default=opt("BACKEND_URL"),
        help="Use this OpenAI-compatible server (vLLM, SGLang, another playground; e.g. http://host:8000) "
        "for chat, completion and images instead of loading models here.",
    )
    add("--backend-api-key", default=opt("BACKEND_API_KEY"), help="API key sent to --backend-url.")
    add(
        "--rate-limit",
        type=int,
        default=opt("RATE_LIMIT", "0"),
        help="At most this many generation requests per minute from each client (UI, gradio_client API "
        "and /v1 together); 0 (the default) sets no limit. For public deployments.",
    )
    add(
        "--trust-proxy-headers",
        action="store_true",
        default=switch("TRUST_PROXY_HEADERS"),
        help="Identify clients by the first X-Forwarded-For hop, for the rate limit. Only behind a proxy "
        "that sets it (a Space): anyone can send the header.",
    )
    add(
        "--trust-remote-code",
        action="store_true",
        default=switch("TRUST_REMOTE_CODE"),
        help="Let model repositories run their own Python code when loading (off by default: only "
        "architectures transformers ships are loaded). Only for repositories you trust.",
    )
    add(
        "--log-prompts",
        action="store_true",
        default=switch("LOG_PROMPTS"),
        help="Log every request's prompt and reply at INFO (off by default: they are the users' business).",
    )
    add(
        "--lora",
        action="append",
        metavar="[NAME=]PATH",
        help="A PEFT LoRA adapter directory to put on the chat model (4-bit ones too), named NAME or after "
        "its directory; repeat for more (PLAYGROUND_LORA: comma-separated). Each request picks one or none.",
    )
    add(
        "--model-choices",
        default=opt("MODEL_CHOICES", ""),
        help="Comma-separated chat models (Hub ids or local directories) the System tab can switch to at "
        "runtime, loaded like --model; the launched model is always one of them.",
    )
    add(
        "--vision-model-choices",
        default=opt("VISION_MODEL_CHOICES", ""),
        help="Comma-separated vision models the System tab can switch to; the launched one is always one.",
    )
    return parser


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
