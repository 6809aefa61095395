"""What a model weighs, module by module, as from_pretrained will hold it; its KV cache and activations.

Measured on the meta device from the config alone, so it costs no weights and works for any GPU.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from itertools import chain

import torch
from accelerate import init_empty_weights
from accelerate.utils import CustomDtype, dtype_byte_size
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import should_convert_module

log = logging.getLogger(__name__)

# Activations, CUDA context and allocator fragmentation, beyond the KV cache.
ACTIVATION_HEADROOM_BYTES = 512 * 2**20
PROJECTORS = ("language_projection", "multi_modal_projector")  # BLIP-2/InstructBLIP, LLaVA


def kv_cache_bytes(config, context_length: int, batch_size: int, dtype_bytes: int) -> int:
    """Keys and values for every layer at full context: 2 x layers x kv_heads x head_dim x tokens."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return 2 * text_config.num_hidden_layers * kv_heads * head_dim * context_length * batch_size * dtype_bytes


@dataclass(frozen=True)
class Unit:
    """What the planner places whole: a no-split module (a decoder layer), a leaf, or a lone tensor."""

    names: tuple[str, ...]  # device-map keys that go to one device (a projector with the input embeddings)
    resident_bytes: int  # on a GPU, or in a CPU-only run: quantized as bitsandbytes loads it
    offloaded_bytes: int  # on CPU/disk beside a GPU: bitsandbytes leaves offloaded modules unquantized
    kv_bytes: int = 0  # this layer's share of the KV cache at the planned context
    follows: int | None = None  # the unit whose device this one shares (tied weights)

    @property
    def gpu_bytes(self) -> int:
        return self.resident_bytes + self.kv_bytes


def activation_bytes(config, context_length: int, batch_size: int, dtype_bytes: int) -> int:
    """Peak of a prefill beyond weights and KV cache: one layer's hidden states and MLP intermediates
    over the whole context, plus the last logits in fp32; never less than ACTIVATION_HEADROOM_BYTES."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    inner = next(
        (getattr(text, k) for k in ("intermediate_size", "ffn_dim", "d_ff") if getattr(text, k, None)),
        4 * hidden,
    )
    peak = batch_size * context_length * (2 * hidden + 3 * inner) * dtype_bytes
    return max(ACTIVATION_HEADROOM_BYTES, peak + batch_size * text.vocab_size * 4)


def quantized_weight_bytes(shape: torch.Size, quantization: str) -> int:
    numel = shape.numel()
    if quantization == "4bit":
        # NF4: two weights a byte; double quantization adds a byte of absmax per 64 weights (+ fp32 per 256).
        blocks = math.ceil(numel / 64)
        return math.ceil(numel * dtype_byte_size(CustomDtype.INT4)) + blocks + math.ceil(blocks / 256) * 4
    # LLM.int8: a byte a weight and an fp32 scale per output row.
    return int(numel * dtype_byte_size(torch.int8)) + shape[0] * 4


def quantized_linear_names(meta_model) -> set[str]:
    """Modules bitsandbytes replaces, by transformers' own rule: plain Linear layers except the output head,
    tied weights, the last module and `_keep_in_fp32_modules` (BLIP-2's Q-Former and query tokens)."""
    skip = HfQuantizer.get_modules_to_not_convert(meta_model, None, meta_model._keep_in_fp32_modules)
    return {
        name
        for name, module in meta_model.named_modules()
        if (type(module) is torch.nn.Linear or isinstance(module, Conv1D))
        and should_convert_module(name, skip)
    }


def tensor_bytes(meta_model, quantization: str, compute_dtype: torch.dtype) -> dict[str, tuple[int, int]]:
    """(resident, offloaded) bytes of every parameter and buffer, as from_pretrained will hold it.

    Tied copies count once (with their source); `_keep_in_fp32_modules` stay fp32 in fp16 loads.
    """
    fp32 = [re.compile(pattern) for pattern in meta_model._get_dtype_plan(compute_dtype)]
    quantized = quantized_linear_names(meta_model) if quantization != "none" else set()
    tied = set(getattr(meta_model, "all_tied_weights_keys", None) or {})
    sizes = {}
    for name, param in meta_model.named_parameters():
        if name in tied:
            sizes[name] = (0, 0)
            continue
        if param.is_floating_point():
            dtype = torch.float32 if any(p.search(name) for p in fp32) else compute_dtype
            full = param.numel() * dtype.itemsize
        else:
            full = param.numel() * param.element_size()
        module, _, leaf = name.rpartition(".")
        is_quantized = module in quantized and leaf == "weight"
        sizes[name] = (quantized_weight_bytes(param.shape, quantization) if is_quantized else full, full)
    for name, buffer in meta_model.named_buffers():
        sizes[name] = (buffer.numel() * buffer.element_size(),) * 2
    return sizes


def placement_pieces(meta_model) -> list[tuple[str, list[str]]]:
    """Device-map keys in module order with the tensors under each: no-split modules and leaves whole,
    a parent's own tensors (BLIP-2's query_tokens) one by one."""
    no_split = set(meta_model._no_split_modules or [])
    pieces: list[tuple[str, list[str]]] = []

    def visit(module, prefix: str) -> None:
        children = list(module.named_children())
        if prefix and (not children or type(module).__name__ in no_split):
            tensors = [f"{prefix}.{n}" for n, _ in chain(module.named_parameters(), module.named_buffers())]
            if tensors:
                pieces.append((prefix, tensors))
            return
        for name, _ in chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False)):
            full = f"{prefix}.{name}" if prefix else name
            pieces.append((full, [full]))
        for name, child in children:
            visit(child, f"{prefix}.{name}" if prefix else name)

    visit(meta_model, "")
    return pieces


def decoder_layer_names(meta_model, layers: int) -> list[str]:
    """The language model's layers: the last ModuleList of that length (vision towers come first)."""
    found: list[str] = []
    for name, module in meta_model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == layers:
            found = [f"{name}.{i}" for i in range(layers)]
    return found


def _projector_groups(meta_model, pieces: list[tuple[str, list[str]]]) -> list[list[int]]:
    """Pieces placed together: the vision projector goes with the language model's input embeddings,
    so the image features meet the token embeddings on one device."""
    groups = [[i] for i in range(len(pieces))]
    embeddings = meta_model.get_input_embeddings()
    embed_name = next((n for n, m in meta_model.named_modules() if m is embeddings), None)
    index = {name: i for i, (name, _) in enumerate(pieces)}
    projector = [i for i, (name, _) in enumerate(pieces) if set(name.split(".")) & set(PROJECTORS)]
    embed = index.get(embed_name)
    if projector and embed is not None and projector == list(range(projector[0], embed)):
        groups = groups[: projector[0]] + [[*projector, embed]] + groups[embed + 1 :]
    return groups


def model_units(meta_model, quantization: str, compute_dtype: torch.dtype, kv_total: int) -> list[Unit]:
    """The model as units in module order, sized, with the KV cache spread over its decoder layers."""
    sizes = tensor_bytes(meta_model, quantization, compute_dtype)
    pieces = placement_pieces(meta_model)
    groups = _projector_groups(meta_model, pieces)
    text_config = meta_model.config.get_text_config()
    layers = set(decoder_layer_names(meta_model, text_config.num_hidden_layers))
    kv_each = kv_total // len(layers) if layers else 0
    group_of = {tensor: g for g, members in enumerate(groups) for i in members for tensor in pieces[i][1]}
    leader = list(range(len(groups)))
    for target, source in (getattr(meta_model, "all_tied_weights_keys", None) or {}).items():
        a, b = sorted((group_of.get(target), group_of.get(source)), key=lambda g: -1 if g is None else g)
        if a is not None and a != b:
            leader[b] = leader[a]  # the later copy follows the earlier one
    units = []
    for g, members in enumerate(groups):
        tensors = [t for i in members for t in pieces[i][1]]
        units.append(
            Unit(
                names=tuple(pieces[i][0] for i in members),
                resident_bytes=sum(sizes[t][0] for t in tensors),
                offloaded_bytes=sum(sizes[t][1] for t in tensors),
                kv_bytes=kv_each * sum(pieces[i][0] in layers for i in members),
                follows=None if leader[g] == g else leader[g],
            )
        )
    return units


def meta_model_from_config(config, model_class=AutoModelForCausalLM):
    with init_empty_weights():
        return model_class.from_config(config, trust_remote_code=False)
