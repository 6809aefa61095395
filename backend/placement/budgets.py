"""Memory budgets: the sizes people type (--gpu-memory 0=20GiB, --cpu-memory 15GiB) and what is free now."""

from __future__ import annotations

import re

import psutil
import torch

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


class InvalidMemorySpec(ValueError):
    pass


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


def memory_in_use() -> dict[str, int]:
    """Bytes in use now: the process's resident memory as "cpu", torch's allocations per visible GPU."""
    used = {"cpu": psutil.Process().memory_info().rss}
    if torch.cuda.is_available():
        used.update({str(i): torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())})
    return used
