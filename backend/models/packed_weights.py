"""Linear layers on the CPU through oneDNN, with each weight packed once into oneDNN's own layout.

Ours because neither transformers nor accelerate does this for eager models, and inductor's freezing
pass, which does, packs float32 weights for MKL instead. Measured on this project's 2-core AMD EPYC
(torch 2.13, MKL 2024.2, oneDNN 3.12), SmolLM2-135M's 49152 x 576 output layer for 8 rows: F.linear 11.7 ms
(10 GB/s) against 3.1 ms packed in float32; 2.3 against 1.4 ms in bfloat16; and its MLP layers faster at
every row count from 1 to 512 (docs/serving.md). MKL's float32 kernels run far below this CPU's bandwidth.

Each weight is stored once: a layer's plain weight is replaced by a meta tensor of the same shape and dtype
(so code that asks a layer for its shape, dtype or features still gets them), unless something else holds
it (an output layer tied to the input embedding; a layer a LoRA adapter wraps, kept for PEFT's own use).

Where this project's own row kernels are built (backend.models.row_kernels: AVX-512 CPUs), layers are packed
for them instead, or moved to them between replies once their build finishes (adopt_row_kernels).

Batch invariance is kept: which kernel runs depends only on the layer, never on the batch, and a decode
step always has the same row count (backend.decode.engine).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psutil
import torch
import torch.nn.functional as F
from torch import nn

from backend.models.row_kernels import RowKernels, RowsWeight

log = logging.getLogger(__name__)

ROWS_HINT = 8  # oneDNN picks the packed layout for this many rows; any row count works with it


class PackedLinear(nn.Linear):
    """An nn.Linear whose forward runs on a weight packed once (`packed`): oneDNN's layout (a tensor), or the
    row kernels' (a RowsWeight). One attribute holds it, so moving a layer to the row kernels is one
    assignment that a forward running in another thread sees whole or not at all."""

    packed: torch.Tensor | RowsWeight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)

    def rows(self, x: torch.Tensor, then: str = "none") -> torch.Tensor:
        """x [rows, in_features] -> [rows, out_features]; `then` "swish" applies SiLU in the same call."""
        packed = self.packed
        if type(packed) is RowsWeight:
            return packed.linear(x, self.bias, None, then)
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, then, [], "")

    def rows_then(self, x: torch.Tensor, other: torch.Tensor, op: str) -> torch.Tensor:
        """(x W^T + b) + other for op "add", or * other for "mul", in one call."""
        packed = self.packed
        if type(packed) is RowsWeight:
            return packed.linear(x, self.bias, other, op)
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, packed, self.bias, op)


@dataclass(frozen=True)
class PackReport:
    layers: int = 0  # linear layers now running packed
    freed_bytes: int = 0  # plain weights dropped (their packed copy replaces them)
    kept_bytes: int = 0  # plain weights kept beside their packed copy (tied or wrapped by LoRA)
    reason: str = ""  # why nothing was packed, when nothing was
    skipped: int = 0  # shared layers left unpacked: a second copy would not fit
    row_layers: int = 0  # of `layers`, those on the row kernels (the rest on oneDNN)

    @property
    def text(self) -> str:
        if not self.layers:
            return f"oneDNN packed weights: off ({self.reason})"
        extra = f", {self.kept_bytes / 2**20:,.0f} MiB kept twice" if self.kept_bytes else ""
        if self.skipped:
            extra += f"; {self.skipped} shared layers left unpacked for lack of memory"
        if not self.row_layers:
            return f"oneDNN packed weights: on ({self.layers} linear layers{extra})"
        if self.row_layers < self.layers:
            extra += f"; {self.layers - self.row_layers} on oneDNN"
        return f"{ROW_KERNELS} on packed weights: on ({self.layers} linear layers{extra})"


ROW_KERNELS = "Row kernels (ours, AVX-512)"


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


def pack_linears(
    model: nn.Module, spare_bytes: int | None = None, kernels: RowKernels | None = None
) -> PackReport:
    """Make every plain nn.Linear of `model` (quantized layers are subclasses and stay as they are) run
    packed: for `kernels` where given and the layer suits them, for oneDNN otherwise. A layer whose plain
    weight must stay (shared) is packed only while the second copies fit in `spare_bytes` (default: half the
    memory available now; the loaders leave out the KV room planned).
    Returns what was done; packs nothing, with the reason, where it cannot."""
    reason = unavailable_reason(model)
    if reason is not None:
        return PackReport(reason=reason)
    spare = psutil.virtual_memory().available // 2 if spare_bytes is None else spare_bytes
    shared = _weights_used_elsewhere(model)
    layers = freed = kept = skipped = row_layers = 0
    checked: set = set()  # kernels checked against F.linear so far
    for module in model.modules():
        if type(module) is not nn.Linear or not module.weight.is_floating_point():
            continue
        weight = module.weight.detach()
        size = weight.numel() * weight.element_size()
        if id(module) in shared and kept + size > spare:
            skipped += 1
            continue
        packed = _pack(weight, kernels)
        if type(packed) is RowsWeight and RowsWeight not in checked:
            if not _agrees(weight, module.bias, packed):  # never expected: oneDNN then serves
                log.warning("The row kernels disagreed with F.linear here; packing for oneDNN instead")
                kernels, packed = None, _pack(weight, None)
            checked.add(RowsWeight)
        if type(packed) is not RowsWeight and "oneDNN" not in checked:
            if not _agrees(weight, module.bias, packed):
                return PackReport(reason="oneDNN's packed linear disagreed with F.linear here")
            checked.add("oneDNN")
        row_layers += type(packed) is RowsWeight
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
    return PackReport(layers, freed, kept, skipped=skipped, row_layers=row_layers)


def adopt_row_kernels(model: nn.Module, kernels: RowKernels) -> int:
    """Move `model`'s oneDNN-packed layers to the row kernels (their build finished after the model loaded);
    returns how many moved. Each layer moves in one assignment (PackedLinear), so a forward running meanwhile
    computes every layer whole, on one kernel or the other; the engine does this between replies so that
    no reply mixes the two (backend.decode.engine)."""
    moved = 0
    for module in model.modules():
        if type(module) is not PackedLinear or type(module.packed) is RowsWeight:
            continue
        if kernels.takes(module.weight):  # its shape and dtype, readable on the meta weight too
            weight = module.weight.detach() if not module.weight.is_meta else module.packed.to_dense()
            packed = kernels.pack(weight)
            if not moved and not _agrees(weight, module.bias, packed):  # never expected: oneDNN serves on
                log.warning("The row kernels disagreed with F.linear here; the layers stay on oneDNN")
                return 0
            module.packed = packed
            moved += 1
    return moved


def _pack(weight: torch.Tensor, kernels: RowKernels | None) -> torch.Tensor | RowsWeight:
    if kernels is not None and kernels.takes(weight):
        return kernels.pack(weight)
    return torch.ops.mkldnn._reorder_linear_weight(weight, ROWS_HINT)


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


def _agrees(weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | RowsWeight) -> bool:
    """Whether the packed kernel computes this layer's maths (checked once, at load, before any reply)."""
    generator = torch.Generator().manual_seed(0)  # not the global one: loading leaves others' draws alone
    x = torch.randn(ROWS_HINT, weight.shape[1], dtype=weight.dtype, generator=generator)
    expected = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    if type(packed) is RowsWeight:
        got = packed.linear(x, bias).double()
    else:
        got = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "").double()
    tolerance = 1e-4 if weight.dtype == torch.float32 else 3e-2
    return bool(torch.allclose(got, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item()))
