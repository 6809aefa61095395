"""LoRA adapters (PEFT) on the chat model, chosen per request: each row of one batch may use its own.

PEFT mixes adapters in a batch through an `adapter_names` forward argument that it hands to its layers
by hooks registered for the length of one call, on modules every thread shares. The engine's decode
thread and beam searches run at the same time, so instead each LoRA layer gets one hook for good that
reads the rows' adapters from the calling thread (`rows_using`); a thread that set none gets the base.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BASE_MODEL = ""  # what a request names for no adapter
PEFT_BASE = "__base__"  # PEFT's name for it in adapter_names
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"  # safetensors only, as for models: no pickles
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# What PEFT saves for a LoRA linear layer: base_model.model.<module>.lora_A.weight [r, in], lora_B [out, r].
LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")

_rows = threading.local()


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    path: str


def parse_adapter(value: str) -> AdapterSpec:
    """`NAME=PATH` or `PATH` (named after its directory); raises ValueError saying what is wrong."""
    name, _, path = value.partition("=") if "=" in value else ("", "", value)
    path = path.strip()
    folder = Path(path).expanduser()
    name = name.strip() or folder.name
    if not NAME.fullmatch(name) or name == PEFT_BASE:
        raise ValueError(f"adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise ValueError(f"{path!r} is not a PEFT adapter directory with {CONFIG_FILE} and {WEIGHTS_FILE}")
    config = json.loads((folder / CONFIG_FILE).read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise ValueError(f"{path!r}: only LoRA adapters (not DoRA) can be chosen per request")
    return AdapterSpec(name, str(folder))


def parse_adapters(values: Iterable[str]) -> tuple[AdapterSpec, ...]:
    adapters = tuple(parse_adapter(value) for value in values if value.strip())
    names = [adapter.name for adapter in adapters]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"two adapters are named {duplicates[0]!r}; name them with NAME=PATH")
    return adapters


def misfit(model, adapter: AdapterSpec) -> str | None:
    """Why the adapter's LoRA weights do not fit `model`'s layers, or None. Reads shapes only."""
    from safetensors import safe_open

    with safe_open(Path(adapter.path) / WEIGHTS_FILE, "pt") as weights:
        for key in weights.keys():  # noqa: SIM118 (safe_open is no dict)
            match = LORA_KEY.fullmatch(key)
            if match is None:
                continue
            module_name, side = match.groups()
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                return f"the model has no layer {module_name}"
            expected = getattr(module, "in_features" if side == "A" else "out_features", None)
            shape = weights.get_slice(key).get_shape()
            found = shape[1] if side == "A" else shape[0]
            if expected is not None and found != expected:
                return f"layer {module_name} has {expected} features where the adapter has {found}"
    return None


def attach_adapters(
    model, adapters: Sequence[AdapterSpec], progress: Callable[[str, float | None], None]
) -> tuple[object, tuple[str, ...], list[str]]:
    """(model with the adapters that fit, their names, notes on those that do not).

    The model becomes a PeftModel; forwards use the base unless `rows_using` names adapters.
    """
    from peft import PeftModel

    wrapped, names, notes = model, [], []
    for adapter in adapters:
        problem = misfit(model, adapter)
        if problem is not None:
            notes.append(f"Adapter {adapter.name!r} does not fit this model ({problem}): left out.")
            continue
        progress(f"Loading adapter {adapter.name} from {adapter.path}", None)
        if isinstance(wrapped, PeftModel):
            wrapped.load_adapter(adapter.path, adapter_name=adapter.name)
        else:
            wrapped = PeftModel.from_pretrained(model, adapter.path, adapter_name=adapter.name)
        names.append(adapter.name)
    if names:
        _install_row_hooks(wrapped)
        wrapped.eval()
    return wrapped, tuple(names), notes


@contextmanager
def rows_using(names: Sequence[str]) -> Iterator[None]:
    """Forwards in this thread apply adapter names[i] to batch row i ("" = the base model); a single
    name applies to every row (a beam search's beams). No effect on a model without adapters."""
    previous = getattr(_rows, "names", None)
    _rows.names = [name or PEFT_BASE for name in names]
    try:
        yield
    finally:
        _rows.names = previous


def _rows_pre_hook(module, args, kwargs):
    names = getattr(_rows, "names", None) or [PEFT_BASE]
    rows = len(args[0] if args else kwargs["x"])
    kwargs["adapter_names"] = names * rows if len(names) == 1 else names
    return args, kwargs


def _install_row_hooks(model) -> None:
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    for module in model.modules():
        if isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper)):
            module.register_forward_pre_hook(_rows_pre_hook, with_kwargs=True)
