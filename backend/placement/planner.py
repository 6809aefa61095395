"""Place the chat model and the vision model together: GPUs within their budgets, then CPU RAM, then disk.

Planned on the meta device from the configs alone (no weights), so it works for GPUs that are not there.
Policy, also in docs/planning.md:

- Units are placed whole: every `_no_split_modules` class (decoder layers), tied weights with their source,
  and a vision model's projector with its language model's input embeddings (image features and token
  embeddings meet on one device). Sizes are what from_pretrained will hold: bitsandbytes quantizes plain
  Linear layers only, never the output head or `_keep_in_fp32_modules`, and leaves offloaded modules
  unquantized.
- Weights first. Each GPU a model runs on keeps room for one prefill's activations and for ONE
  full-context request's KV cache of the layers it holds. The first GPU of a model also keeps the KV cache
  of its offloaded layers and room to copy in the largest of them (accelerate runs offloaded layers there).
  A model without a GPU keeps all that in RAM. So layers leave the GPUs only when the weights plus one
  request do not fit.
- Then the KV pools (kv_pool.py): what the budgets leave on the devices holding a model's cache becomes
  its pool, up to --max-batch-size full-context requests; two models sharing a device share it evenly.
- The chat model has first claim on the GPUs. The vision model goes whole onto the smallest GPU that
  holds it if the chat model still fits entirely on the GPUs beside it. Otherwise the chat model is placed
  first and the vision model takes what is left: whole on a GPU, else whole on the CPU, else split.
- The chat model's layers are balanced over the GPUs in proportion to their free room; what does not fit
  goes to the CPU, then to disk. `fits` is False when anything must go to disk.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from backend.placement.advice import device_warnings, offload_warnings
from backend.placement.kv_pool import kv_need, size_pools
from backend.placement.plans import (
    Device,
    DevicePlan,
    DeviceUse,
    JointPlan,
    ModelPlacement,
    collapse_device_map,
)
from backend.placement.sizes import (
    Unit,
    activation_bytes,
    kv_cache_bytes,
    meta_model_from_config,
    model_units,
)

ROLES = ("text", "vision")


@dataclass(frozen=True)
class ModelRequest:
    role: str  # "text" (the chat model) or "vision"
    name: str
    config: Any  # a transformers config
    quantization: str  # none | 8bit | 4bit
    dtype: torch.dtype  # compute dtype
    context_length: int
    batch_size: int = 1  # full-context requests the KV pool may grow to (placement reserves one)

    @property
    def model_class(self):
        return AutoModelForCausalLM if self.role == "text" else AutoModelForImageTextToText


# ----------------------------------------------------------------------------- the planner


@dataclass
class _Model:
    request: ModelRequest
    units: list[Unit]
    activation: int
    loose_kv: int  # KV cache of layers the planner could not find: kept where the model runs

    @property
    def kv(self) -> int:
        return sum(u.kv_bytes for u in self.units) + self.loose_kv

    @property
    def whole_bytes(self) -> int:
        return sum(u.resident_bytes for u in self.units) + self.kv + self.activation


@dataclass
class _Ledger:
    budgets: dict[Device, int]
    planned: dict[Device, int] = field(default_factory=dict)
    reserved: dict[Device, int] = field(default_factory=dict)

    def free(self, device: Device) -> int:
        return self.budgets[device] - self.planned.get(device, 0) - self.reserved.get(device, 0)

    def copy(self) -> _Ledger:
        return _Ledger(dict(self.budgets), dict(self.planned), dict(self.reserved))

    def add(self, planned: dict[Device, int], reserved: dict[Device, int]) -> None:
        for d, n in planned.items():
            self.planned[d] = self.planned.get(d, 0) + n
        for d, n in reserved.items():
            self.reserved[d] = self.reserved.get(d, 0) + n


@dataclass
class _Placed:
    places: list[Device]  # one per unit
    planned: dict[Device, int]
    reserved: dict[Device, int]

    @property
    def devices(self) -> list[Device]:
        return list(dict.fromkeys(self.places))


def plan_models(
    requests: list[ModelRequest],
    gpu_budgets: dict[int, int],
    cpu_budget: int,
    disk_budget: int | None = None,
) -> JointPlan:
    """Place at most one text and one vision model over the GPUs (hypothetical ones too), CPU and disk.

    The caller's dicts are never changed.
    """
    roles = [r.role for r in requests]
    if any(r not in ROLES for r in roles) or len(set(roles)) != len(roles):
        raise ValueError(f"plan at most one model per role ({', '.join(ROLES)}); got {roles}")
    gpus = sorted(gpu_budgets)
    disk = disk_budget if disk_budget is not None else shutil.disk_usage(tempfile.gettempdir()).free
    ledger = _Ledger({**{g: gpu_budgets[g] for g in gpus}, "cpu": cpu_budget, "disk": disk})
    models = {r.role: _prepare(r) for r in requests}
    text, vision = models.get("text"), models.get("vision")
    placed: dict[str, _Placed] = {}
    if vision is not None:
        gpu = _vision_gpu_beside(vision, text, ledger, gpus)
        if gpu is not None:
            placed["vision"] = _commit(ledger, _whole(vision, gpu))
    if text is not None:
        placed["text"] = _commit(ledger, _split(text, ledger, gpus, balanced=True))
    if vision is not None and "vision" not in placed:
        placed["vision"] = _commit(ledger, _vision_in_what_is_left(vision, ledger, gpus, text is not None))
    return _finish(models, placed, ledger)


def _prepare(request: ModelRequest) -> _Model:
    """Sized for placement: one full-context request's KV cache and one prefill's activations."""
    meta = meta_model_from_config(request.config, request.model_class)
    dtype_bytes = request.dtype.itemsize
    kv = kv_cache_bytes(request.config, request.context_length, 1, dtype_bytes)
    units = model_units(meta, request.quantization, request.dtype, kv)
    activation = activation_bytes(request.config, request.context_length, 1, dtype_bytes)
    return _Model(request, units, activation, kv - sum(u.kv_bytes for u in units))


def _vision_gpu_beside(vision: _Model, text: _Model | None, ledger: _Ledger, gpus: list[int]) -> int | None:
    """The smallest GPU that holds the vision model whole while the chat model still fits the GPUs."""
    for gpu in sorted((g for g in gpus if ledger.free(g) >= vision.whole_bytes), key=ledger.free):
        if text is None:
            return gpu
        trial = ledger.copy()
        _commit(trial, _whole(vision, gpu))
        if all(isinstance(p, int) for p in _split(text, trial, gpus, balanced=True).places):
            return gpu
    return None


def _vision_in_what_is_left(vision: _Model, ledger: _Ledger, gpus: list[int], cpu_whole: bool) -> _Placed:
    """Whole on a GPU; beside a chat model that needs the GPUs, whole on the CPU; else split."""
    for device in [*sorted(gpus, key=ledger.free), *(["cpu"] if cpu_whole else [])]:
        if ledger.free(device) >= vision.whole_bytes:
            return _whole(vision, device)
    return _split(vision, ledger, gpus, balanced=False)


def _whole(model: _Model, device: Device) -> _Placed:
    weights = sum(u.resident_bytes for u in model.units)
    return _Placed([device] * len(model.units), {device: weights}, {device: model.kv + model.activation})


def _commit(ledger: _Ledger, placed: _Placed) -> _Placed:
    ledger.add(placed.planned, placed.reserved)
    return placed


def _split(model: _Model, ledger: _Ledger, gpus: list[int], balanced: bool) -> _Placed:
    """GPUs (balanced or filled in order), then CPU, then disk; never changes `ledger`.

    The first GPU a model uses also keeps the KV cache of its offloaded layers and room to copy in the
    largest of them. When it cannot, the next GPU is tried as the first; when none can, the model runs
    on the CPU.
    """
    for start, main in enumerate(gpus):
        usable, extra = gpus[start:], 0
        while True:
            rooms = [(g, ledger.free(g) - model.activation - (extra if g == main else 0)) for g in usable]
            rooms = [(g, room) for g, room in rooms if room > 0]
            places = _fill_gpus(model.units, rooms, balanced)
            if balanced and None in places:
                places = _fill_gpus(model.units, rooms, balanced=False)
            if not rooms or rooms[0][0] != main or places[0] != main:
                break  # this GPU cannot lead: try the next one
            offloaded = [u for u, p in zip(model.units, places, strict=True) if p is None]
            needed = model.loose_kv + sum(u.kv_bytes for u in offloaded)
            needed += max((u.offloaded_bytes for u in offloaded), default=0)  # one copied in at a time
            if needed <= extra:
                return _spill(model, ledger, places, main, extra)
            extra = needed  # only grows, so this ends
    return _spill(model, ledger, [None] * len(model.units), None, 0)


def _fill_gpus(units: list[Unit], rooms: list[tuple[int, int]], balanced: bool) -> list[Device | None]:
    """Leaders in order onto the GPUs; balanced: each GPU takes its share of the total, by its room."""
    leaders = [i for i, u in enumerate(units) if u.follows is None]
    total = sum(units[i].gpu_bytes for i in leaders)
    room_total = sum(room for _, room in rooms)
    places: list[Device | None] = [None] * len(units)
    k = 0
    for n, (gpu, room) in enumerate(rooms):
        last = n == len(rooms) - 1
        target = room * min(total, room_total) // room_total if balanced and not last else room
        used = 0
        while k < len(leaders):
            cost = units[leaders[k]].gpu_bytes
            if used + cost > room or (used + cost / 2 > target and used > 0):
                break
            places[leaders[k]] = gpu
            used += cost
            k += 1
    return _with_followers(units, places)


def _with_followers(units: list[Unit], places: list) -> list:
    return [places[u.follows] if u.follows is not None else p for u, p in zip(units, places, strict=True)]


def _spill(model: _Model, ledger: _Ledger, places: list, main: int | None, extra: int) -> _Placed:
    """Units left off the GPUs go to the CPU while it has room, then to disk, in order.

    A model on no GPU runs on the CPU: its KV cache, activations and one disk part at a time live there.
    Beside a GPU or beside disk, bitsandbytes leaves the CPU and disk parts unquantized.
    """
    units = model.units
    on_gpu = main is not None
    cpu_room = ledger.free("cpu") - (0 if on_gpu else model.kv + model.activation)
    staging, unquantized = 0, on_gpu
    while True:
        spilled = _cpu_then_disk(units, places, cpu_room - staging, unquantized)
        disk = [u for u, p in zip(units, spilled, strict=True) if p == "disk"]
        needed = 0 if on_gpu else max((u.offloaded_bytes for u in disk), default=0)
        if needed <= staging and (unquantized or not disk):
            break
        staging, unquantized = max(staging, needed), unquantized or bool(disk)  # only grow, so this ends
    planned: dict[Device, int] = {}
    reserved: dict[Device, int] = {}
    for u, place in zip(units, spilled, strict=True):
        full = place == "disk" or (place == "cpu" and unquantized)
        planned[place] = planned.get(place, 0) + (u.offloaded_bytes if full else u.resident_bytes)
        if isinstance(place, int):
            reserved[place] = reserved.get(place, 0) + u.kv_bytes
    for gpu in {p for p in spilled if isinstance(p, int)}:
        reserved[gpu] += model.activation + (extra if gpu == main else 0)
    if not on_gpu:
        reserved["cpu"] = model.kv + model.activation + staging
    return _Placed(spilled, planned, reserved)


def _cpu_then_disk(units: list[Unit], places: list, cpu_room: int, unquantized: bool) -> list[Device]:
    spilled, used, to_disk = list(places), 0, False
    for i, u in enumerate(units):
        if spilled[i] is not None or u.follows is not None:
            continue
        cost = u.offloaded_bytes if unquantized else u.resident_bytes
        to_disk = to_disk or used + cost > cpu_room
        spilled[i] = "disk" if to_disk else "cpu"
        used += 0 if to_disk else cost
    return _with_followers(units, spilled)


def _finish(models: dict[str, _Model], placed: dict[str, _Placed], ledger: _Ledger) -> JointPlan:
    needs = {
        role: kv_need(
            [u.kv_bytes for u in models[role].units],
            where.places,
            models[role].loose_kv,
            models[role].request.context_length,
            models[role].request.batch_size,
        )
        for role, where in placed.items()
    }
    pools = size_pools(needs, {d: ledger.free(d) for d in ledger.budgets})
    for role, pool in pools.items():
        ledger.add({}, needs[role].extra_bytes(pool.tokens))  # the pool beyond one request is kept too
    devices = {
        d: DeviceUse(budget, ledger.planned.get(d, 0), ledger.reserved.get(d, 0))
        for d, budget in ledger.budgets.items()
    }
    placements, warnings = [], []
    has_gpus = any(isinstance(d, int) for d in ledger.budgets)
    for role in (r for r in ROLES if r in placed):
        model, where, r = models[role], placed[role], models[role].request
        device_map = collapse_device_map(
            {name: place for u, place in zip(model.units, where.places, strict=True) for name in u.names}
        )
        mine = offload_warnings(role, where.places, where.planned, has_gpus, len(placed) == 2)
        total = sum(where.planned.values())
        placements.append(
            ModelPlacement(role, r.name, r.dtype, r.quantization, device_map, total, tuple(mine), pools[role])
        )
        warnings += mine
    first, last = device_warnings(
        devices,
        sum(where.places.count("disk") for where in placed.values()),
        {role: models[role].request.quantization for role in placed},
        sum(models[role].kv + models[role].activation for role in placed),
    )
    return JointPlan(devices, tuple(placements), (*first, *warnings, *last))


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
    """One model alone, through the joint planner; a `model_class` other than a causal LM: a vision model."""
    role = "text" if model_class is AutoModelForCausalLM else "vision"
    request = ModelRequest(role, "", config, quantization, compute_dtype, context_length, batch_size)
    return plan_models([request], gpu_budgets, cpu_budget).device_plan(role)
