"""Command-line flags, each also settable by an environment variable PLAYGROUND_<FLAG> (for a Space)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

GPU_DEFAULT = ("lmsys/vicuna-7b-v1.5", "4bit")
CPU_DEFAULT = ("HuggingFaceTB/SmolLM2-360M-Instruct", "none")
GPU_VISION_DEFAULT = ("Salesforce/blip2-opt-2.7b", "4bit")
CPU_VISION_DEFAULT = ("llava-hf/llava-interleave-qwen-0.5b-hf", "none")
NO_VISION = "none"


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
        "--no-packed-weights",
        action="store_true",
        default=switch("NO_PACKED_WEIGHTS"),
        help="On the CPU, run linear layers through PyTorch's default kernels instead of oneDNN on weights "
        "packed once at load (about 3x faster in float32 here; see docs/serving.md).",
    )
    add(
        "--no-row-kernels",
        action="store_true",
        default=switch("NO_ROW_KERNELS"),
        help="On AVX-512 CPUs, keep oneDNN's kernels for packed weights instead of this project's own row "
        "kernels, which are compiled here once (about 25 s, cached) while the app already serves "
        "(about 1.5x faster per decode step here; see docs/serving.md).",
    )
    add(
        "--no-fused-decode",
        action="store_true",
        default=switch("NO_FUSED_DECODE"),
        help="Decode through transformers' forward instead of the engine's fused step for Llama, Mistral and "
        "Qwen2 models on packed CPU weights (faster for one user; see docs/serving.md).",
    )
    add(
        "--malloc-trim-seconds",
        type=float,
        default=opt("MALLOC_TRIM_SECONDS", "30"),
        help="How often freed memory is handed back to the system (glibc's malloc_trim); 0 turns it off. "
        "With it and at most 2 malloc arenas (unless MALLOC_ARENA_MAX is set) memory stays flat under "
        "load (see docs/serving.md).",
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
