"""What the planner decides: per device its budget and use, per model its device map, and how to show it."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

Device = int | str  # a GPU index, "cpu" or "disk"
GiB = 2**30


@dataclass(frozen=True)
class DevicePlan:
    device_map: dict[str, int | str]
    budgets: dict[int | str, int] = field(default_factory=dict)  # what the user allowed per device
    reserved: dict[int | str, int] = field(default_factory=dict)  # kept free for KV cache + activations
    warnings: tuple[str, ...] = ()
    dtype: torch.dtype | None = None  # the compute dtype the plan was sized for
    joint: JointPlan | None = None  # the JointPlan this model's part came from (both models, all devices)
    kv_cache_tokens: int | None = None  # this model's KV pool: the tokens its engine may hold at once

    @property
    def offloaded(self) -> bool:
        """Part of a GPU plan landed on CPU or disk (an all-CPU plan is not offloaded)."""
        places = set(self.device_map.values())
        return bool(places & {"cpu", "disk"}) and any(isinstance(p, int) for p in places)


@dataclass(frozen=True)
class DeviceUse:
    budget_bytes: int
    planned_bytes: int = 0  # weights
    reserved_bytes: int = 0  # KV cache and activations


@dataclass(frozen=True)
class KVPool:
    """A model's KV cache as planned: what its placed layers leave on their devices, at least one request."""

    tokens: int  # tokens of KV cache the model may hold at once, over all its requests
    bytes: int  # what they take, over all devices holding the cache
    context_length: int  # tokens of one full-context request

    @property
    def max_concurrency(self) -> float:
        """Full-context requests that fit, rounded down to hundredths so that it never promises more."""
        return math.floor(100 * self.tokens / self.context_length) / 100

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "bytes": self.bytes, "max_concurrency": self.max_concurrency}

    def text(self) -> str:
        return (
            f"KV cache: {self.tokens:,} tokens ({size_text(self.bytes)}), room for "
            f"{self.max_concurrency:.2f} full-context requests ({self.context_length:,} tokens each)"
        )


@dataclass(frozen=True)
class ModelPlacement:
    role: str
    name: str
    dtype: torch.dtype
    quantization: str
    device_map: dict[str, Device]  # as from_pretrained takes it: GPUs as ints
    total_bytes: int  # weights as placed (offloaded parts unquantized)
    warnings: tuple[str, ...] = ()
    kv_cache: KVPool | None = None  # None only for placements made without a planner

    def parts_on(self, device: Device) -> list[str]:
        """Which modules sit on `device`, with runs of layers shortened: "model.layers.0–15"."""
        keys = [key for key, place in self.device_map.items() if place == device]
        return ["whole model"] if keys == [""] else shorten_ranges(keys)


@dataclass(frozen=True)
class JointPlan:
    devices: dict[Device, DeviceUse]  # GPUs in order, then "cpu" and "disk"
    models: tuple[ModelPlacement, ...]
    warnings: tuple[str, ...] = ()

    @property
    def fits(self) -> bool:
        """Nothing needs to go to disk."""
        return self.devices["disk"].planned_bytes == 0

    def model(self, role: str) -> ModelPlacement:
        return next(m for m in self.models if m.role == role)

    def device_plan(self, role: str) -> DevicePlan:
        """One model's part, as the loaders take it; budgets and reservations are the devices' totals."""
        placement = self.model(role)
        budgets = {d: use.budget_bytes for d, use in self.devices.items() if d != "disk"}
        reserved = {d: use.reserved_bytes for d, use in self.devices.items() if use.reserved_bytes}
        tokens = placement.kv_cache.tokens if placement.kv_cache is not None else None
        return DevicePlan(
            placement.device_map,
            budgets,
            reserved,
            self.warnings,
            dtype=placement.dtype,
            joint=self,
            kv_cache_tokens=tokens,
        )

    def to_json(self) -> dict:
        return {
            "devices": {
                str(d): {
                    "budget_bytes": use.budget_bytes,
                    "planned_bytes": use.planned_bytes,
                    "reserved_bytes": use.reserved_bytes,
                }
                for d, use in self.devices.items()
            },
            "models": [
                {
                    "role": m.role,
                    "name": m.name,
                    "dtype": dtype_name(m.dtype),
                    "quantization": m.quantization,
                    "total_bytes": m.total_bytes,
                    "device_map": {key: str(place) for key, place in m.device_map.items()},
                    **({"kv_cache": m.kv_cache.to_json()} if m.kv_cache is not None else {}),
                }
                for m in self.models
            ],
            "fits": self.fits,
            "warnings": list(self.warnings),
        }

    def view(self, in_use: dict[str, int] | None = None) -> dict:
        """Plain data for the System tab: per device its numbers and the modules of each model on it."""
        devices = []
        for d, use in self.devices.items():
            models = [
                {"role": m.role, "name": m.name, "parts": m.parts_on(d)} for m in self.models if m.parts_on(d)
            ]
            if d == "disk" and not models:
                continue
            devices.append(
                {
                    "key": str(d),
                    "label": device_label(d),
                    "budget_bytes": use.budget_bytes,
                    "planned_bytes": use.planned_bytes,
                    "reserved_bytes": use.reserved_bytes,
                    "in_use_bytes": (in_use or {}).get(str(d)),
                    "models": models,
                }
            )
        models = [
            {
                "role": m.role,
                "name": m.name,
                "kv_cache": {**m.kv_cache.to_json(), "context_length": m.kv_cache.context_length}
                if m.kv_cache is not None
                else None,
            }
            for m in self.models
        ]
        return {"fits": self.fits, "warnings": list(self.warnings), "devices": devices, "models": models}

    def to_text(self) -> str:
        lines = [f"Device plan: {'fits' if self.fits else 'DOES NOT FIT'}", ""]
        lines.append(f"{'device':<8}{'budget':>12}{'weights':>12}{'reserved':>12}{'free':>12}")
        for d, use in self.devices.items():
            if d == "disk" and not use.planned_bytes:
                continue
            free = use.budget_bytes - use.planned_bytes - use.reserved_bytes
            numbers = (use.budget_bytes, use.planned_bytes, use.reserved_bytes, free)
            lines.append(f"{device_label(d):<8}" + "".join(f"{size_text(n):>12}" for n in numbers))
        for m in self.models:
            quantized = "not quantized" if m.quantization == "none" else m.quantization
            lines += [
                "",
                f"{m.role}: {m.name} ({dtype_name(m.dtype)}, {quantized}, {size_text(m.total_bytes)})",
            ]
            for d in self.devices:
                if parts := m.parts_on(d):
                    lines.append(f"  {device_label(d)}: {', '.join(parts)}")
            if m.kv_cache is not None:
                lines.append(f"  {m.kv_cache.text()}")
        if self.warnings:
            lines += ["", "Warnings:"] + [f"  - {w}" for w in self.warnings]
        return "\n".join(lines)


def collapse_device_map(assigned: dict[str, Device]) -> dict[str, Device]:
    """The shortest map: a module whose pieces all share a device becomes one entry ("" = the whole model)."""
    collapsed: dict[str, Device] = {}

    def visit(prefix: str) -> None:
        under = [n for n in assigned if not prefix or n == prefix or n.startswith(prefix + ".")]
        places = {assigned[n] for n in under}
        if len(places) == 1:
            collapsed[prefix] = places.pop()
            return
        start = len(prefix) + 1 if prefix else 0
        for child in dict.fromkeys(n[start:].split(".")[0] for n in under if n != prefix):
            visit(f"{prefix}.{child}" if prefix else child)

    visit("")
    return collapsed


def shorten_ranges(keys: list[str]) -> list[str]:
    """["a.layers.0", "a.layers.1", "a.layers.2", "b"] -> ["a.layers.0–2", "b"]."""
    runs: list[list] = []  # [prefix, first, last] or [key, None, None]
    for key in keys:
        match = re.fullmatch(r"(.*\.)(\d+)", key)
        if match and runs and runs[-1][0] == match.group(1) and runs[-1][2] == int(match.group(2)) - 1:
            runs[-1][2] += 1
        elif match:
            runs.append([match.group(1), int(match.group(2)), int(match.group(2))])
        else:
            runs.append([key, None, None])
    return [
        key if first is None else f"{key}{first}" if first == last else f"{key}{first}–{last}"
        for key, first, last in runs
    ]


def device_label(device: Device) -> str:
    return f"GPU {device}" if isinstance(device, int) else {"cpu": "CPU", "disk": "disk"}[device]


def device_labels(devices: list[Device]) -> str:
    return ", ".join(device_label(d) for d in devices)


def size_text(n: int) -> str:
    """Bytes for people: GiB for model-sized numbers, MiB or KiB for small ones."""
    for unit, scale in (("GiB", GiB), ("MiB", 2**20)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 2**10:.1f} KiB" if n else "0 B"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
