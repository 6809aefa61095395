"""Where each module of a model goes: GPUs within their budgets, then CPU, then disk.

Planned on the meta device from the config alone, so a plan costs no weights and works for
GPUs that are not present (budgets describe hypothetical devices).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
from accelerate import init_empty_weights
from accelerate.utils import CustomDtype, infer_auto_device_map
from transformers import AutoModelForCausalLM

log = logging.getLogger(__name__)

UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
# Activations, CUDA context and allocator fragmentation, beyond the KV cache.
ACTIVATION_HEADROOM_BYTES = 512 * 2**20


class InvalidMemorySpec(ValueError):
    pass


@dataclass(frozen=True)
class DevicePlan:
    device_map: dict[str, int | str]
    budgets: dict[int | str, int] = field(default_factory=dict)  # what the user allowed per device
    reserved: dict[int | str, int] = field(default_factory=dict)  # kept free for KV cache + activations
    warnings: tuple[str, ...] = ()

    @property
    def offloaded(self) -> bool:
        """Part of a GPU plan landed on CPU or disk (an all-CPU plan is not offloaded)."""
        places = set(self.device_map.values())
        return bool(places & {"cpu", "disk"}) and any(isinstance(p, int) for p in places)


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", text)  # float() accepts each
    unit = (match.group(2).lower() or "b") if match else ""
    if not match or unit not in UNITS:
        raise InvalidMemorySpec(f"cannot read the size {text!r}; write e.g. 20GiB or 500MB")
    return int(float(match.group(1)) * UNITS[unit])


def parse_gpu_memory(spec: str | None) -> dict[int, int]:
    """'0=20GiB,1=10GiB' -> {0: bytes, 1: bytes}."""
    budgets: dict[int, int] = {}
    for item in filter(None, (part.strip() for part in (spec or "").split(","))):
        device, sep, size = item.partition("=")
        if not sep or not device.strip().isdigit():
            raise InvalidMemorySpec(f"cannot read {item!r}; write GPU budgets as 0=20GiB,1=10GiB")
        budgets[int(device)] = parse_size(size)
    return budgets


def visible_gpu_budgets(fraction: float = 0.9) -> dict[int, int]:
    """A fraction of each visible GPU's free memory: other programs may already use some."""
    if not torch.cuda.is_available():
        return {}
    return {i: int(torch.cuda.mem_get_info(i)[0] * fraction) for i in range(torch.cuda.device_count())}


def kv_cache_bytes(config, context_length: int, batch_size: int, dtype_bytes: int) -> int:
    """Keys and values for every layer at full context: 2 x layers x kv_heads x head_dim x tokens."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return 2 * text_config.num_hidden_layers * kv_heads * head_dim * context_length * batch_size * dtype_bytes


def sizing_dtype(quantization: str, compute_dtype: torch.dtype):
    # accelerate's string 'int4' sizes modules as 0 bytes; the enum sizes them right.
    return {"4bit": CustomDtype.INT4, "8bit": torch.int8}.get(quantization, compute_dtype)


def full_precision_params(
    meta_model, quantization: str, compute_dtype: torch.dtype
) -> dict[str, torch.dtype]:
    """bitsandbytes quantizes only Linear layers, and never the output head."""
    if quantization == "none":
        return {}
    output = meta_model.get_output_embeddings()
    special = {}
    for module_name, module in meta_model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not output:
            continue
        for param_name, _ in module.named_parameters(recurse=False):
            special[f"{module_name}.{param_name}" if module_name else param_name] = compute_dtype
    return special


def meta_model_from_config(config, model_class=AutoModelForCausalLM):
    with init_empty_weights():
        return model_class.from_config(config, trust_remote_code=False)


def plan_device_map(
    config,
    quantization: str,
    compute_dtype: torch.dtype,
    gpu_budgets: dict[int, int],
    cpu_budget: int,
    context_length: int,
    batch_size: int = 1,
    model_class=AutoModelForCausalLM,
) -> DevicePlan:
    """Plan without weights. No GPU budgets: everything on the CPU. `model_class` builds the meta model."""
    if not gpu_budgets:
        return DevicePlan({"": "cpu"}, {"cpu": cpu_budget}, {}, ())
    kv_total = kv_cache_bytes(config, context_length, batch_size, torch.finfo(compute_dtype).bits // 8)
    total_budget = sum(gpu_budgets.values())
    # Each GPU keeps its share of the KV cache free, in proportion to the layers it is likely to hold.
    reserved = {d: ACTIVATION_HEADROOM_BYTES + kv_total * b // total_budget for d, b in gpu_budgets.items()}
    max_memory: dict[int | str, int] = {d: max(0, b - reserved[d]) for d, b in gpu_budgets.items()}
    max_memory["cpu"] = cpu_budget
    meta_model = meta_model_from_config(config, model_class)
    device_map = infer_auto_device_map(
        meta_model,
        max_memory=dict(max_memory),  # a copy: accelerate mutates the dict it is given
        no_split_module_classes=list(meta_model._no_split_modules or []),
        dtype=sizing_dtype(quantization, compute_dtype),
        special_dtypes=full_precision_params(meta_model, quantization, compute_dtype),
    )
    warnings = []
    places = set(device_map.values())
    if "cpu" in places:
        warnings.append("Some layers are offloaded to CPU RAM: generation will be much slower.")
    if "disk" in places:
        warnings.append("Some layers are offloaded to disk: generation will be very slow.")
    budgets: dict[int | str, int] = {**gpu_budgets, "cpu": cpu_budget}
    return DevicePlan(device_map, budgets, dict(reserved), tuple(warnings))
