"""Soak test: many concurrent clients against one server for a while, loopback only, bounded.

    .venv/bin/python benchmarks/soak.py                       # 16 clients, 180 s, demo models
    .venv/bin/python benchmarks/soak.py --clients 4 --seconds 10

Clients mix settings (sample/greedy/beam, stop words, lengths), cancel some replies part-way and
send some invalid requests. The run passes when no valid request failed, every invalid one got a
clear error, and the server's memory (RSS) grew by less than --max-rss-growth-mb.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"
INVALID = [
    ({"message": ""}, "Message is empty"),
    ({"message": "hi", "top_p": 0}, "'top_p'"),
    ({"message": "hi", "num_beams": 0}, "'num_beams'"),
    ({"message": "x" * 30_000}, "characters"),
]


@dataclass
class Tally:
    valid_ok: int = 0
    valid_failed: int = 0
    invalid_refused: int = 0
    invalid_wrong: int = 0
    cancelled: int = 0
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, note: str | None = None) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)
            if note and len(self.failures) < 20:
                self.failures.append(note)


def valid_request(rng: random.Random) -> dict:
    mode = rng.choices(["sample", "greedy", "beam"], weights=[6, 3, 1])[0]
    return {
        "message": rng.choice(["Hello", "Tell me about the sea", "Count to five", "Why is the sky blue?"]),
        "seed": rng.randrange(0, 10_000),
        "mode": mode,
        "temperature": rng.choice([0.3, 0.7, 1.0, 1.3]),
        "top_k": rng.choice([0, 10, 50]),
        "top_p": rng.choice([0.5, 0.9, 1.0]),
        "max_new_tokens": rng.randrange(4, 48) if mode != "beam" else 8,
        "num_beams": 2,
        "stop_words": rng.choice(["", "\n", "the"]),
    }


def client(url: str, index: int, deadline: float, max_requests: int, tally: Tally) -> None:
    from gradio_client import Client

    rng = random.Random(index)
    api = Client(url, verbose=False)
    for _ in range(max_requests):
        if time.time() >= deadline:
            return
        roll = rng.random()
        if roll < 0.1:
            kwargs, words = rng.choice(INVALID)
            try:
                api.predict(api_name="/chat", **kwargs)
                tally.add("invalid_wrong", f"accepted {list(kwargs)}")
            except Exception as error:
                good = words in str(error)
                tally.add("invalid_refused" if good else "invalid_wrong", None if good else str(error)[:200])
        elif roll < 0.25:
            job = api.submit(
                api_name="/chat", **{**valid_request(rng), "max_new_tokens": 200, "mode": "sample"}
            )
            time.sleep(rng.uniform(0.05, 0.5))
            job.cancel()
            tally.add("cancelled")
        else:
            try:
                api.predict(api_name="/chat", **valid_request(rng))
                tally.add("valid_ok")
            except Exception as error:
                tally.add("valid_failed", f"{type(error).__name__}: {str(error)[:200]}")


def soak(
    clients: int,
    seconds: float,
    max_requests: int,
    max_rss_growth_mb: float,
    model: str = "demo:tiny-llama-chat",
) -> dict:
    from app import create_app
    from backend.app_config import parse_config

    config = parse_config(
        ["--model", model, "--vision-model", "none", "--dtype", "float32"], has_gpu=False, env={}
    )
    demo, _ = create_app(config, load_in_background=False)
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    process = psutil.Process()
    try:
        # Warm up first so one-time allocations do not count as growth.
        threads = [
            threading.Thread(target=client, args=(demo.local_url, 100 + i, time.time() + 3, 3, Tally()))
            for i in range(min(clients, 4))
        ]
        [t.start() for t in threads]
        [t.join() for t in threads]
        rss_start = process.memory_info().rss
        tally = Tally()
        deadline = time.time() + seconds
        threads = [
            threading.Thread(target=client, args=(demo.local_url, i, deadline, max_requests, tally))
            for i in range(clients)
        ]
        started = time.time()
        [t.start() for t in threads]
        [t.join(seconds + 120) for t in threads]
        elapsed = time.time() - started
        rss_end = process.memory_info().rss
    finally:
        demo.close()
    growth_mb = (rss_end - rss_start) / 2**20
    report = {f.name: getattr(tally, f.name) for f in fields(tally) if f.name != "lock"}
    report.update(
        clients=clients,
        seconds=round(elapsed, 1),
        rss_start_mb=round(rss_start / 2**20, 1),
        rss_end_mb=round(rss_end / 2**20, 1),
        rss_growth_mb=round(growth_mb, 1),
        max_rss_growth_mb=max_rss_growth_mb,
    )
    report["passed"] = (
        tally.valid_failed == 0
        and tally.invalid_wrong == 0
        and tally.valid_ok > 0
        and growth_mb < max_rss_growth_mb
    )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--max-requests", type=int, default=500, help="per client, a hard bound on the loop")
    parser.add_argument("--max-rss-growth-mb", type=float, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    report = soak(args.clients, args.seconds, args.max_requests, args.max_rss_growth_mb)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
