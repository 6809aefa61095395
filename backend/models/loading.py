"""Load a causal LM and its tokenizer: resolve files, plan devices, quantize, from_pretrained.

The demo model and real checkpoints take this same path; only where the files come from differs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from backend.models.adapters import AdapterSpec, attach_adapters
from backend.models.configs import load_config
from backend.models.demo_text import DEMO_TEXT_MODEL, demo_text_model_dir, is_demo_model_dir
from backend.models.hub import ModelUnavailable, resolve_model_dir
from backend.models.packed_weights import pack_linears
from backend.models.row_kernels import KernelBuild
from backend.placement.budgets import memory_in_use, parse_gpu_memory, parse_size, visible_gpu_budgets
from backend.placement.planner import ModelRequest, plan_models
from backend.placement.plans import DevicePlan, JointPlan

log = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "8bit", "4bit")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ProgressFn = Callable[[str, float | None], None]


@dataclass(frozen=True)
class ModelSpec:
    """What to load and how; every field has a command-line flag and an environment variable."""

    name: str
    quantization: str = "none"  # none | 8bit | 4bit
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    gpu_memory: str | None = None  # "0=20GiB,1=10GiB"; None: 90% of each visible GPU's free memory
    cpu_memory: str | None = None  # None: 80% of available RAM
    context_length: int | None = None  # KV-cache headroom is planned for this; None: the model's window
    max_batch_size: int = 8  # requests decoded together: the KV pool is sized for this many
    offload_dir: str | None = None
    trust_remote_code: bool = False  # --trust-remote-code: the repository's own Python code may run
    adapters: tuple[AdapterSpec, ...] = ()  # --lora: LoRA adapters put on the chat model, chosen per request
    packed_weights: bool = True  # CPU linears run oneDNN on packed weights (--no-packed-weights)
    row_kernels: bool = True  # ...or our own row kernels where built (--no-row-kernels)
    # The build of those kernels (backend.models.row_kernels), shared by the app's models; None: oneDNN only.
    kernel_build: KernelBuild | None = field(default=None, compare=False)
    # This model's part of a plan made for both models before loading (with_joint_plan); None: plan it alone.
    planned: DevicePlan | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}"
            )
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    spec: ModelSpec
    path: Path
    is_demo: bool
    plan: DevicePlan
    dtype: torch.dtype
    load_seconds: float
    notes: list[str] = field(default_factory=list)
    adapters: tuple[str, ...] = ()  # names of the LoRA adapters loaded on the model
    kernels: str = ""  # which linear kernels run (backend.models.packed_weights)
    awaiting_kernels: KernelBuild | None = None  # packed for oneDNN while the row kernels build

    @property
    def context_window(self) -> int:
        return context_window(self.model.config, self.tokenizer)

    def system_report(self) -> dict:
        """The device plan and the memory in use now, as plain data for the System tab."""
        return self.plan.joint.view(memory_in_use()) if self.plan.joint is not None else {}


def context_window(model_config, tokenizer) -> int:
    """The model's position limit; a tokenizer's model_max_length is often a 1e30 placeholder."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", 0)
    return limit if 0 < limit < 1_000_000 else 2048


def input_device(model) -> torch.device:
    """Where input ids must go: the embedding's device, also for models split by a device map."""
    return model.get_input_embeddings().weight.device


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_dtype(requested: str, on_gpu: bool) -> torch.dtype:
    """fp16/bf16 on GPU; on CPU bf16 only where the CPU has bf16 instructions, else fp32."""
    if requested != "auto":
        return DTYPES[requested]
    if on_gpu:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def quantization_config(
    quantization: str, compute_dtype: torch.dtype, offloaded: bool
) -> BitsAndBytesConfig | None:
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_enable_fp32_cpu_offload=offloaded,  # the name says int8; 4-bit needs it too
        )
    if quantization == "8bit":
        # Modules planned onto CPU stay unquantized in fp32; bitsandbytes needs to be told.
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=offloaded)
    return None


def keeps_offload_unquantized(plan: DevicePlan) -> bool:
    """bitsandbytes refuses CPU or disk parts beside other devices unless they stay unquantized."""
    places = set(plan.device_map.values())
    return places != {"cpu"} and bool(places & {"cpu", "disk"})


def remote_code(spec: ModelSpec) -> bool:
    """The spec's trust_remote_code for from_pretrained, announced loudly when on."""
    if spec.trust_remote_code:
        log.warning(
            "trust_remote_code is ON (--trust-remote-code): loading %s may run Python code from its "
            "repository on this machine. Use it only with repositories you trust.",
            spec.name,
        )
    return spec.trust_remote_code


def model_files(spec: ModelSpec, progress: ProgressFn) -> Path:
    if spec.name == DEMO_TEXT_MODEL:
        progress("Preparing the built-in demo model", None)
        return demo_text_model_dir()
    return resolve_model_dir(spec.name, progress)


def gpu_budgets(spec: ModelSpec, hypothetical: bool) -> tuple[dict[int, int], list[str]]:
    """Budgets per GPU, and notes. Loading leaves out GPUs that are not here; planning may describe them."""
    gpus = parse_gpu_memory(spec.gpu_memory) if spec.gpu_memory else visible_gpu_budgets()
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    absent = sorted(g for g in gpus if g >= visible)
    if not absent:
        return gpus, []
    names = ", ".join(map(str, absent))
    if hypothetical:
        return gpus, [f"GPU {names} not present here: planned as --gpu-memory describes."]
    if not visible:
        return {}, ["--gpu-memory names GPUs but none is visible: loading on the CPU."]
    return {g: b for g, b in gpus.items() if g < visible}, [
        f"--gpu-memory names GPU {names}: not visible, left out."
    ]


def plan_specs(
    specs: dict[str, ModelSpec], configs: dict | None = None, hypothetical_gpus: bool = False
) -> JointPlan:
    """Where the models ({"text": spec, "vision": spec}) go, planned together from their configs alone.

    The loaders and `app.py --plan` both plan here. Budgets come from the first spec (both come from the
    same flags). Configs not given are looked up without the network (backend.models.configs). Each
    model's KV pool holds up to max_batch_size full-context requests (DevicePlan.kv_cache_tokens).
    """
    configs = configs or {}
    first = next(iter(specs.values()))
    gpus, notes = gpu_budgets(first, hypothetical_gpus)
    cpu_budget = (
        parse_size(first.cpu_memory) if first.cpu_memory else int(psutil.virtual_memory().available * 0.8)
    )
    requests = []
    for role, spec in specs.items():
        config = configs[role] if role in configs else load_config(spec.name)
        # A vision model's position limit is its language model's.
        context = spec.context_length or context_window(config.get_text_config(), None)
        dtype = choose_dtype(spec.dtype, on_gpu=bool(gpus))
        requests.append(
            ModelRequest(role, spec.name, config, spec.quantization, dtype, context, spec.max_batch_size)
        )
    plan = plan_models(requests, gpus, cpu_budget)
    lead = 0 if plan.fits else 1  # "Does not fit: ..." stays the first warning
    return replace(plan, warnings=(*plan.warnings[:lead], *notes, *plan.warnings[lead:]))


def plan_report(specs: dict[str, ModelSpec], as_json: bool) -> str:
    """`app.py --plan`: the joint plan as text or JSON; --gpu-memory may describe GPUs that are not here."""
    plan = plan_specs(specs, hypothetical_gpus=True)
    return json.dumps(plan.to_json(), indent=2) if as_json else plan.to_text()


def with_joint_plan(specs: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
    """The specs, each carrying its part of one plan for all of them, so that loading them one after the
    other fills the devices as planned together. Unchanged when a config cannot be had offline."""
    try:
        plan = plan_specs(specs)
    except (ModelUnavailable, OSError, ValueError) as error:
        log.warning("Planning the models together failed (%s); each is planned alone when it loads", error)
        return specs
    return {role: replace(spec, planned=plan.device_plan(role)) for role, spec in specs.items()}


def plan_placement(
    spec: ModelSpec, config, model_class=AutoModelForCausalLM
) -> tuple[DevicePlan, torch.dtype, list[str]]:
    """Device map and compute dtype within the spec's budgets, plus notes for the user.

    The joint plan the spec carries when it was made for this model; otherwise this model planned alone.
    """
    role = "text" if model_class is AutoModelForCausalLM else "vision"
    plan = spec.planned
    if (
        plan is None
        or plan.joint is None
        or not any(m.role == role and m.name == spec.name for m in plan.joint.models)
    ):
        plan = plan_specs({role: spec}, {role: config}).device_plan(role)
    return plan, plan.dtype, list(plan.warnings)


def load_text_model(spec: ModelSpec, progress: ProgressFn | None = None) -> LoadedModel:
    """Resolve, plan and load; raises hub.ModelUnavailable when the files cannot be had."""
    report = progress or (lambda stage, fraction: None)
    started = time.perf_counter()
    path = model_files(spec, report)
    trust = remote_code(spec)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    plan, dtype, notes = plan_placement(spec, config)
    report(f"Loading tokenizer from {path}", None)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    report(f"Loading weights ({spec.quantization}, {str(dtype).removeprefix('torch.')})", None)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        device_map=plan.device_map,
        quantization_config=quantization_config(spec.quantization, dtype, keeps_offload_unquantized(plan)),
        trust_remote_code=trust,
        use_safetensors=True,
        offload_folder=spec.offload_dir,
    )
    model.eval()
    model, adapters, adapter_notes = attach_adapters(model, spec.adapters, report)
    notes += adapter_notes
    kernels, awaiting = linear_kernels(model, spec, plan)
    seconds = time.perf_counter() - started
    log.info("Loaded %s in %.1f s (%s, %s)", spec.name, seconds, spec.quantization, dtype)
    for note in adapter_notes:
        log.warning("%s", note)
    return LoadedModel(
        model, tokenizer, spec, path, is_demo_model_dir(path), plan, dtype, seconds, notes, adapters, kernels,
        awaiting,
    )  # fmt: skip


def linear_kernels(model, spec: ModelSpec, plan: DevicePlan) -> tuple[str, KernelBuild | None]:
    """Pack the model's CPU linear layers unless --no-packed-weights: for the row kernels when their build
    is ready (waiting for one loading from its cache), for oneDNN otherwise. Returns what runs, in words,
    and the build the model awaits (its layers move when it is ready: backend.services.model_engine).
    Second copies of shared weights may take half of what the plan's KV room leaves free."""
    if not spec.packed_weights:
        return "PyTorch's default linear kernels (--no-packed-weights)", None
    spare = max(0, psutil.virtual_memory().available - plan.reserved.get("cpu", 0)) // 2
    build = spec.kernel_build
    usable = build is not None and spec.row_kernels
    kernels = build.kernels(wait=CACHED_BUILD_WAIT if build.was_cached else 0) if usable else None
    report = pack_linears(model, spare, kernels)
    log.info("%s", report.text)
    awaiting = build if usable and build.building and report.layers else None
    if build is not None and kernels is None and awaiting is None and report.layers:
        why = build.text() if spec.row_kernels else "row kernels unavailable: off (--no-row-kernels)"
        return f"{report.text}; {why}", None  # off, no compiler, a failed build: the System tab says which
    return report.text, awaiting


# Seconds a load waits for row kernels in the cache: well under 1 s here, about 20 when ninja rebuilds a
# source with a newer timestamp (after a checkout); a cold build is not waited for.
CACHED_BUILD_WAIT = 30.0
