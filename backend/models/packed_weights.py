"""Linear layers on the CPU through oneDNN, with each weight packed once into oneDNN's own layout.

Ours because neither transformers nor accelerate does this for eager models, and inductor's freezing
pass, which does, packs float32 weights for MKL instead. Measured on this project's 2-core AMD EPYC
(torch 2.13, MKL 2024.2, oneDNN 3.12), SmolLM2-135M's 49152 x 576 output layer for 8 rows: F.linear 11.7 ms
(10 GB/s) against 3.1 ms packed in float32; 2.3 against 1.4 ms in bfloat16; and its MLP layers faster at
every row count from 1 to 512 (docs/serving.md). MKL's float32 kernels run far below this CPU's bandwidth.

Each weight is stored once: a layer's plain weight is replaced by a meta tensor of the same shape and dtype
(so code that asks a layer for its shape, dtype or features still gets them), unless something else holds
it (an output layer tied to the input embedding; a layer a LoRA adapter wraps, kept for PEFT's own use).

Batch invariance is kept: which kernel runs depends only on the layer, never on the batch, and a decode
step always has the same row count (backend.decode.engine).
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch
import torch.nn.functional as F
from torch import nn

ROWS_HINT = 8  # oneDNN picks the packed layout for this many rows; any row count works with it


class PackedLinear(nn.Linear):
    """An nn.Linear whose forward runs oneDNN's linear on a weight packed once (`packed`)."""

    packed: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)

    def rows(self, x: torch.Tensor, then: str = "none") -> torch.Tensor:
        """x [rows, in_features] -> [rows, out_features]; `then` "swish" applies SiLU in the same call."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, then, [], "")

    def rows_then(self, x: torch.Tensor, other: torch.Tensor, op: str) -> torch.Tensor:
        """(x W^T + b) + other for op "add", or * other for "mul", in one oneDNN call."""
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.packed, self.bias, op)


@dataclass(frozen=True)
class PackReport:
    layers: int = 0  # linear layers now running packed
    freed_bytes: int = 0  # plain weights dropped (their packed copy replaces them)
    kept_bytes: int = 0  # plain weights kept beside their packed copy (tied or wrapped by LoRA)
    reason: str = ""  # why nothing was packed, when nothing was
    skipped: int = 0  # shared layers left unpacked: a second copy would not fit

    @property
    def text(self) -> str:
        if not self.layers:
            return f"oneDNN packed weights: off ({self.reason})"
        extra = f", {self.kept_bytes / 2**20:,.0f} MiB kept twice" if self.kept_bytes else ""
        if self.skipped:
            extra += f"; {self.skipped} shared layers left unpacked for lack of memory"
        return f"oneDNN packed weights: on ({self.layers} linear layers{extra})"


def unavailable_reason(model: nn.Module) -> str | None:
    """Why this model's linear layers cannot be packed here, or None when they can."""
    if not (torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available()):
        return "this torch has no oneDNN"
    if torch.cuda.is_available():  # ZeroGPU moves a model loaded on the CPU to a GPU later: keep it movable
        return "a GPU is present"
    parameters = list(model.parameters())
    if any(p.device.type != "cpu" for p in parameters):
        return "the model is not wholly on the CPU"
    dtypes = {p.dtype for p in parameters if p.is_floating_point()}
    if torch.float16 in dtypes and not torch.ops.mkldnn._is_mkldnn_fp16_supported():
        return "this CPU has no float16 instructions for oneDNN"
    if torch.bfloat16 in dtypes and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU has no bfloat16 instructions for oneDNN"
    if any(hasattr(module, "_hf_hook") for module in model.modules()):
        return "accelerate offloads part of the model"
    return None


def pack_linears(model: nn.Module, spare_bytes: int | None = None) -> PackReport:
    """Make every plain nn.Linear of `model` (quantized layers are subclasses and stay as they are) run
    packed. A layer whose plain weight must stay (shared) is packed only while the second copies fit in
    `spare_bytes` (default: half the memory available now; the loaders leave out the KV room planned).
    Returns what was done; packs nothing, with the reason, where it cannot."""
    reason = unavailable_reason(model)
    if reason is not None:
        return PackReport(reason=reason)
    spare = psutil.virtual_memory().available // 2 if spare_bytes is None else spare_bytes
    shared = _weights_used_elsewhere(model)
    layers = freed = kept = skipped = 0
    for module in model.modules():
        if type(module) is not nn.Linear or not module.weight.is_floating_point():
            continue
        weight = module.weight.detach()
        size = weight.numel() * weight.element_size()
        if id(module) in shared and kept + size > spare:
            skipped += 1
            continue
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, ROWS_HINT)
        if not layers and not _agrees(weight, module.bias, packed):
            return PackReport(reason="oneDNN's packed linear disagreed with F.linear here")
        module.__class__ = PackedLinear
        module.packed = packed
        if id(module) in shared:
            kept += size
        else:  # one copy: the packed one (a meta tensor keeps the shape and dtype others read)
            module.weight = nn.Parameter(torch.empty_like(weight, device="meta"), requires_grad=False)
            freed += size
        layers += 1
    if not layers:
        return PackReport(reason="no plain linear layers" if not skipped else "no memory for a second copy")
    return PackReport(layers, freed, kept, skipped=skipped)


def _weights_used_elsewhere(model: nn.Module) -> set[int]:
    """ids of linear layers whose weight something else also uses: a tied embedding, a LoRA wrapper."""
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            owners.setdefault(id(parameter), []).append(module)
    shared = {id(m) for users in owners.values() if len(users) > 1 for m in users if type(m) is nn.Linear}
    for module in model.modules():
        base = getattr(module, "base_layer", None)  # PEFT's wrappers read their base layer's weight
        if isinstance(base, nn.Module) and module is not base:
            shared.add(id(base))
    return shared


def _agrees(weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor) -> bool:
    """Whether the packed kernel computes this layer's maths (checked once, at load, before any reply)."""
    generator = torch.Generator().manual_seed(0)  # not the global one: loading leaves others' draws alone
    x = torch.randn(ROWS_HINT, weight.shape[1], dtype=weight.dtype, generator=generator)
    expected = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    got = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "").double()
    tolerance = 1e-4 if weight.dtype == torch.float32 else 3e-2
    return bool(torch.allclose(got, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item()))
