"""Where a server's memory goes under sustained load: Python allocations, live objects and the allocator.

    .venv/bin/python benchmarks/memory_profile.py --minutes 12 --clients 16
    MALLOC_ARENA_MAX=2 .venv/bin/python benchmarks/memory_profile.py --minutes 12 --tag arena2

The app runs in this process as `app.py` runs it (the dtype it picks, the demo models, /v1 and the UI
on one port); the clients of benchmarks/soak.py run in another process. After a warm-up, every
--every seconds it records, next to the process's RSS:
- the bytes Python has allocated and still holds (tracemalloc) and the lines whose holdings grew most
  since the warm-up, with their call stacks;
- with --count-types, the live container objects by type whose counts grew most (a diagnostic that can
  fail a request under load; tests/test_leaks.py checks our request objects without that risk);
- glibc's view: bytes in use, bytes free inside its heaps, and how many arenas it has.
If RSS climbs while Python's and glibc's in-use bytes stay flat, the growth is free memory the
allocator keeps (fragmentation across arenas), not objects we keep.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).resolve().parent / "results"


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def glibc_view() -> dict:
    """Bytes in use and free in glibc's heaps, and its arena count (empty off glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return {}
    info = libc.mallinfo2()
    with tempfile.NamedTemporaryFile("r", suffix=".xml") as sink:
        libc.fopen.restype = ctypes.c_void_p
        stream = libc.fopen(sink.name.encode(), b"w")
        libc.malloc_info(0, ctypes.c_void_p(stream))
        libc.fclose(ctypes.c_void_p(stream))
        arenas = len(re.findall(r"<heap nr=", Path(sink.name).read_text()))
    mb = 2**20
    return {
        "in_use_mb": round((info.uordblks + info.hblkhd) / mb, 1),
        "free_in_heaps_mb": round(info.fordblks / mb, 1),
        "mmapped_mb": round(info.hblkhd / mb, 1),
        "arenas": arenas,
    }


def rss_parts() -> dict:
    """Anonymous (heap, stacks, arenas) and file-backed (libraries paged in) resident memory, MB."""
    parts = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssFile", "RssShmem"):
            parts[name] = round(int(value.split()[0]) / 1024, 1)
    return parts


def live_types(enabled: bool) -> Counter:
    """Live container objects by type. Off by default: gc.get_objects() from this thread can hand out a
    tuple another thread is still building, and CPython then fails that thread's tuple() (SystemError)."""
    if not enabled:
        return Counter()
    return Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(port: int, allocator: str):
    import torch
    import uvicorn

    from app import create_server
    from backend.allocator import AllocatorKeeper, AllocatorPolicy
    from backend.config import parse_config

    if allocator == "tuned":  # as app.py's main does
        AllocatorKeeper(AllocatorPolicy()).start()

    argv = ["--model", "demo:tiny-llama-chat", "--vision-model", "demo:tiny-llava", "--port", str(port)]
    config = parse_config(argv + ["--host", "127.0.0.1"], has_gpu=torch.cuda.is_available())
    app, _, holders = create_server(config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, name="uvicorn", daemon=True).start()
    return server, holders, config.placement.dtype


def wait_ready(url: str, seconds: float = 300) -> None:
    import httpx

    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not become ready")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=12)
    parser.add_argument("--warm-up", type=float, default=120, help="seconds of load before the baseline")
    parser.add_argument("--every", type=float, default=120, help="seconds between samples")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--frames", type=int, default=12, help="stack depth tracemalloc keeps")
    parser.add_argument("--tag", default="default", help="names the results file")
    parser.add_argument("--count-types", action="store_true", help="live objects by type (see live_types)")
    parser.add_argument(
        "--allocator",
        choices=["tuned", "default"],
        default="tuned",
        help="backend.allocator's policy or glibc's",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server, _, dtype = start_server(port, args.allocator)
    wait_ready(url)
    seconds = args.warm_up + args.minutes * 60
    clients = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--url", url + "/"]
        + ["--clients", str(args.clients), "--seconds", str(seconds)],
        stdout=subprocess.PIPE,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    process = psutil.Process()
    time.sleep(args.warm_up)  # a benchmark's pacing, not synchronisation: load runs meanwhile
    tracemalloc.start(args.frames)
    gc.collect()
    baseline, base_types, started = tracemalloc.take_snapshot(), live_types(args.count_types), time.time()
    samples = []
    while clients.poll() is None:
        gc.collect()
        snapshot = tracemalloc.take_snapshot()
        types = live_types(args.count_types)
        growth = snapshot.compare_to(baseline, "traceback")
        sample = {
            "minute": round((time.time() - started) / 60, 2),
            "rss_mb": round(process.memory_info().rss / 2**20, 1),
            "rss_parts_mb": rss_parts(),
            "python_traced_mb": round(tracemalloc.get_traced_memory()[0] / 2**20, 1),
            "threads": threading.active_count(),
            "glibc": glibc_view(),
            "top_growth": [
                {
                    "kb": round(stat.size_diff / 1024, 1),
                    "count": stat.count_diff,
                    "stack": [f"{frame.filename}:{frame.lineno}" for frame in stat.traceback[-6:]],
                }
                for stat in growth[:12]
            ],
            "types_grown": (types - base_types).most_common(15),
        }
        samples.append(sample)
        shown = ("minute", "rss_mb", "rss_parts_mb", "python_traced_mb", "threads", "glibc")
        print(json.dumps({k: sample[k] for k in shown}), flush=True)
        del snapshot, growth
        with contextlib.suppress(subprocess.TimeoutExpired):
            clients.wait(args.every)
    tally = json.loads(clients.stdout.read() or b"{}")
    server.should_exit = True
    report = {"tag": args.tag, "dtype": dtype, "allocator": args.allocator}
    report["env"] = {"MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX")}
    report.update(clients=args.clients, tally=tally, samples=samples)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"memory-profile-{args.tag}.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
