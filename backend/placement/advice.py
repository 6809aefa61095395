"""What a plan tells people: where a model will be slow, and when the models do not fit, by how much and
what to change."""

from __future__ import annotations

from backend.placement.plans import Device, DeviceUse, device_label, device_labels, size_text

QUANTIZE_FLAGS = {"text": "--quantization 4bit", "vision": "--vision-quantization 4bit"}


def device_warnings(
    devices: dict[Device, DeviceUse], on_disk: int, quantizations: dict[str, str], kept: int
) -> tuple[list[str], list[str]]:
    """(first, last): the shortfall when anything goes to disk, to lead the warnings; devices over budget.

    `on_disk` counts the parts planned there, `quantizations` is each placed model's by role, and `kept`
    the room kept per model for one full-context request (KV cache and activations).
    """
    last = [
        f"{device_label(d)} is over its budget by {size_text(over)}."
        for d, use in devices.items()
        if d != "disk" and (over := use.planned_bytes + use.reserved_bytes - use.budget_bytes) > 0
    ]
    missing = devices["disk"].planned_bytes
    if not missing:
        return [], last
    quantize = [QUANTIZE_FLAGS[role] for role, q in quantizations.items() if q != "4bit"]
    first = [
        f"Does not fit: {size_text(missing)} more GPU or CPU memory is needed ({on_disk} parts would be "
        "offloaded to disk). Raise --gpu-memory/--cpu-memory"
        + (f", quantize ({' and '.join(quantize)})" if quantize else "")
        + f", or lower --context-length (one full-context request's KV cache and activations take "
        f"{size_text(kept)})."
    ]
    if missing > devices["disk"].budget_bytes:
        last.append(
            f"Disk offload needs {size_text(missing)} but only "
            f"{size_text(devices['disk'].budget_bytes)} are free."
        )
    return first, last


def offload_warnings(
    role: str, places: list[Device], planned: dict[Device, int], has_gpus: bool, both: bool
) -> list[str]:
    """One model's: on the CPU beside GPUs, split over devices, parts offloaded to CPU or disk."""
    model = "The chat model" if role == "text" else "The vision model"
    warnings = []
    devices = list(dict.fromkeys(places))
    on_gpu = any(isinstance(d, int) for d in devices)
    if has_gpus and not on_gpu:
        why = (
            "so that the chat model keeps the GPUs"
            if role == "vision" and both
            else "as no GPU has room for it"
        )
        slow = "captions" if role == "vision" else "generation"
        warnings.append(f"{model} runs on the CPU {why}: {slow} will be slow.")
    if role == "vision" and len(devices) > 1:
        warnings.append(
            f"{model} does not fit whole on one device: it is split over {device_labels(devices)}."
        )
    count = {d: places.count(d) for d in ("cpu", "disk")}
    if on_gpu and count["cpu"]:
        warnings.append(
            f"{model}: {count['cpu']} of {len(places)} parts are offloaded to CPU RAM "
            f"({size_text(planned['cpu'])}): generation will be much slower (their weights cross to "
            "the GPU at every step)."
        )
    if count["disk"]:
        warnings.append(
            f"{model}: {count['disk']} of {len(places)} parts are offloaded to disk "
            f"({size_text(planned['disk'])}): generation will be very slow (their weights are read "
            "from disk at every step)."
        )
    return warnings
