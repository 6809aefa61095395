"""Soak test: many concurrent clients against one server for a while, loopback only, bounded.

    .venv/bin/python benchmarks/soak.py                       # 16 clients, 180 s, demo models
    .venv/bin/python benchmarks/soak.py --clients 4 --seconds 10
    .venv/bin/python benchmarks/soak.py --server-process --minutes 60   # the app in its own process
    .venv/bin/python benchmarks/soak.py --url http://127.0.0.1:7860/ --seconds 600   # clients only

Clients mix settings (sample/greedy/beam, stop words, lengths), ask for image captions (which
share the vision model's batching engine), cancel some replies part-way and send some invalid
requests and files that are not images. The run passes when no valid request failed, every invalid one got a
clear error, and memory is flat: after a warm-up at full concurrency, the process's RSS
(server and clients) grew by less than --max-rss-growth-mb over the second half of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
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
    captions_ok: int = 0  # of valid_ok
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


def caption_request(rng: random.Random) -> dict:
    mode = rng.choice(["sample", "greedy"])
    return {
        "prompt": rng.choice(["", "What is in it?"]),
        "seed": rng.randrange(0, 10_000),
        "mode": mode,
        "top_k": rng.choice([0, 10, 50]),
        "max_new_tokens": rng.randrange(4, 24),
    }


def write_images(folder: Path) -> dict[str, Path]:
    """A picture to caption and a text file named like one, which must be refused clearly."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    good, bad = folder / "picture.png", folder / "notes.png"
    Image.new("RGB", (64, 48), (200, 120, 40)).save(good)
    bad.write_text("these are notes, not pixels")
    return {"good": good, "bad": bad}


def client(url: str, index: int, deadline: float, max_requests: int, tally: Tally, images: dict) -> None:
    from gradio_client import Client, handle_file

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
        elif roll < 0.2:
            job = api.submit(
                api_name="/chat", **{**valid_request(rng), "max_new_tokens": 200, "mode": "sample"}
            )
            time.sleep(rng.uniform(0.05, 0.5))
            job.cancel()
            tally.add("cancelled")
        elif roll < 0.25 and images:
            image = handle_file(str(images["good"]))
            job = api.submit(
                api_name="/caption", image=image, **{**caption_request(rng), "max_new_tokens": 200}
            )
            time.sleep(rng.uniform(0.05, 0.5))
            job.cancel()
            tally.add("cancelled")
        elif roll < 0.28 and images:
            try:
                api.predict(
                    api_name="/caption", image=handle_file(str(images["bad"])), **caption_request(rng)
                )
                tally.add("invalid_wrong", "accepted a text file as an image")
            except Exception as error:
                good = "not an image" in str(error)
                tally.add("invalid_refused" if good else "invalid_wrong", None if good else str(error)[:200])
        elif roll < 0.4 and images:
            try:
                api.predict(
                    api_name="/caption", image=handle_file(str(images["good"])), **caption_request(rng)
                )
                tally.add("valid_ok")
                tally.add("captions_ok")
            except Exception as error:
                tally.add("valid_failed", f"caption {type(error).__name__}: {str(error)[:200]}")
        else:
            try:
                api.predict(api_name="/chat", **valid_request(rng))
                tally.add("valid_ok")
            except Exception as error:
                tally.add("valid_failed", f"{type(error).__name__}: {str(error)[:200]}")


def run_clients(
    url: str, clients: int, seconds: float, max_requests: int, tally: Tally, images: dict, seed_offset=0
) -> None:
    deadline = time.time() + seconds
    threads = [
        threading.Thread(target=client, args=(url, seed_offset + i, deadline, max_requests, tally, images))
        for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 120)


def soak(
    clients: int,
    seconds: float,
    max_requests: int,
    max_rss_growth_mb: float,
    model: str = "demo:tiny-llama-chat",
    vision_model: str = "demo:tiny-llava",
) -> dict:
    from app import create_app
    from backend.config import parse_config

    config = parse_config(
        ["--model", model, "--vision-model", vision_model, "--dtype", "float32"], has_gpu=False, env={}
    )
    images = write_images(Path(tempfile.mkdtemp(prefix="soak-images-"))) if vision_model != "none" else {}
    demo, _ = create_app(config, load_in_background=False)
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    process = psutil.Process()
    warm_up = min(30.0, seconds / 4)
    try:
        # Warm up at full concurrency first: thread arenas and caches reach their working size,
        # so what grows afterwards is what would keep growing.
        run_clients(demo.local_url, clients, warm_up, max_requests, Tally(), images, seed_offset=1000)
        rss_start = process.memory_info().rss
        tally = Tally()
        samples: list[float] = []
        started = time.time()
        runner = threading.Thread(
            target=run_clients, args=(demo.local_url, clients, seconds, max_requests, tally, images)
        )
        runner.start()
        while runner.is_alive():
            samples.append(round(process.memory_info().rss / 2**20, 1))
            runner.join(10)
        elapsed = time.time() - started
        rss_end = process.memory_info().rss
    finally:
        demo.close()
    growth_mb = (rss_end - rss_start) / 2**20
    # Flat means the second half of the run adds (almost) nothing: a leak keeps its slope.
    midpoint = samples[len(samples) // 2] if samples else rss_start / 2**20
    late_growth_mb = rss_end / 2**20 - midpoint
    report = {f.name: getattr(tally, f.name) for f in fields(tally) if f.name != "lock"}
    report.update(
        clients=clients,
        seconds=round(elapsed, 1),
        warm_up_seconds=warm_up,
        rss_samples_mb=samples,
        rss_start_mb=round(rss_start / 2**20, 1),
        rss_end_mb=round(rss_end / 2**20, 1),
        rss_growth_mb=round(growth_mb, 1),
        rss_growth_second_half_mb=round(late_growth_mb, 1),
        max_rss_growth_mb=max_rss_growth_mb,
    )
    report["passed"] = (
        tally.valid_failed == 0
        and tally.invalid_wrong == 0
        and tally.valid_ok > 0
        and late_growth_mb < max_rss_growth_mb
    )
    return report


def soak_server_process(
    clients: int,
    minutes: float,
    max_slope_mb_per_min: float,
    arguments: tuple[str, ...] = (),
    environment: dict[str, str] | None = None,
) -> dict:
    """The app in a process of its own, as a Space runs it (the dtype it picks, demo models): only the
    server's RSS is sampled, every 10 s; flat means its slope over the last half is under the bound.
    `arguments` and `environment` are added to the app's command line and environment."""
    import socket
    import subprocess

    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = Path(__file__).resolve().parent.parent / "app.py"
    command = [
        sys.executable,
        str(app),
        "--model",
        "demo:tiny-llama-chat",
        "--vision-model",
        "demo:tiny-llava",
    ]
    command += ["--host", "127.0.0.1", "--port", str(port), *arguments]
    log_path = Path(tempfile.mkdtemp(prefix="soak-server-")) / "server.log"
    # No Hub here: the demo models, as offline users get.
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(environment or {})}
    with log_path.open("w") as server_log:
        server = subprocess.Popen(command, stdout=server_log, stderr=subprocess.STDOUT, env=environment)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # up to 5 minutes to load, then the readiness probe says so
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise RuntimeError("the server exited while starting")
            time.sleep(0.5)
        else:
            raise RuntimeError("the server did not become ready")
        images = write_images(Path(tempfile.mkdtemp(prefix="soak-images-")))
        rss = psutil.Process(server.pid)
        tally, samples = Tally(), []
        seconds = minutes * 60
        started = time.time()
        runner = threading.Thread(
            target=run_clients, args=(url + "/", clients, seconds, 10 * int(seconds) + 500, tally, images)
        )
        runner.start()
        while runner.is_alive():
            samples.append((round(time.time() - started, 1), round(rss.memory_info().rss / 2**20, 1)))
            runner.join(10)
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:  # reported, and the run's numbers kept
            server.kill()
            server.wait(60)
    late = samples[len(samples) // 2 :]
    slope = _slope(late) * 60 if len(late) > 1 else 0.0
    report = {f.name: getattr(tally, f.name) for f in fields(tally) if f.name != "lock"}
    report.update(
        clients=clients,
        minutes=minutes,
        rss_series_mb=samples,
        rss_start_mb=samples[0][1] if samples else None,
        rss_end_mb=samples[-1][1] if samples else None,
        slope_last_half_mb_per_min=round(slope, 3),
        max_slope_mb_per_min=max_slope_mb_per_min,
        server_log=str(log_path),
        arguments=list(arguments),
        environment=environment_shown(environment),
    )
    report["passed"] = tally.valid_failed == 0 and tally.valid_ok > 0 and slope < max_slope_mb_per_min
    return report


def environment_shown(environment: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in environment.items() if name.startswith(("MALLOC_", "PLAYGROUND_"))}


# glibc's own behaviour, for comparison: 8 arenas per core, freed memory kept until it is at the heap's top.
GLIBC_DEFAULT = {"MALLOC_ARENA_MAX": str(8 * (os.cpu_count() or 1)), "PLAYGROUND_MALLOC_TRIM_SECONDS": "0"}


def compare_allocators(clients: int, minutes: float, max_slope: float) -> dict:
    """The app as it starts (backend.allocator's policy) and with glibc's defaults, side by side in one run,
    each with half the clients."""
    reports: dict[str, dict] = {}

    def run(name: str, environment: dict[str, str]) -> None:
        reports[name] = soak_server_process(max(clients // 2, 1), minutes, max_slope, (), environment)

    arms = [threading.Thread(target=run, args=arm) for arm in (("app", {}), ("glibc_default", GLIBC_DEFAULT))]
    for arm in arms:
        arm.start()
    for arm in arms:
        arm.join()
    return reports


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares MB per second through (seconds, MB) points."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points) or 1.0
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


def plot_rss(report: dict, path: Path) -> None:
    """The server's RSS over the run (Pillow only)."""
    from PIL import Image, ImageDraw

    points = report["rss_series_mb"]
    image = Image.new("RGB", (720, 320), "white")
    draw = ImageDraw.Draw(image)
    if len(points) > 1:
        low, high = min(y for _, y in points), max(y for _, y in points)
        span_y, span_x = (high - low) or 1.0, points[-1][0] or 1.0
        xy = [(40 + 660 * x / span_x, 280 - 240 * (y - low) / span_y) for x, y in points]
        draw.line(xy, fill=(249, 115, 22), width=2)
        draw.text((40, 284), f"0 … {span_x / 60:.0f} min", fill="black")
        draw.text((4, 30), f"{high:.0f} MB", fill="black")
        draw.text((4, 272), f"{low:.0f} MB", fill="black")
    draw.text(
        (40, 8),
        f"server RSS, {report['clients']} clients; "
        f"last-half slope {report['slope_last_half_mb_per_min']} MB/min",
        fill="black",
    )
    image.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--max-requests", type=int, default=500, help="per client, a hard bound on the loop")
    parser.add_argument(
        "--max-rss-growth-mb", type=float, default=50, help="over the second half of the run, after warm-up"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--server-process", action="store_true", help="the app in its own process")
    parser.add_argument("--minutes", type=float, default=60, help="with --server-process: how long")
    parser.add_argument("--max-slope", type=float, default=0.5, help="MB/min over the last half, server only")
    parser.add_argument("--url", help="only the clients, against a server already running there")
    parser.add_argument(
        "--compare-allocator",
        action="store_true",
        help="with --server-process: the app and the app on glibc's allocator defaults, side by side",
    )
    args = parser.parse_args(argv)
    if args.url:  # e.g. for benchmarks/memory_profile.py, which looks inside the server meanwhile
        tally = Tally()
        images = write_images(Path(tempfile.mkdtemp(prefix="soak-images-")))
        run_clients(args.url, args.clients, args.seconds, 10 * int(args.seconds) + 500, tally, images)
        report = {f.name: getattr(tally, f.name) for f in fields(tally) if f.name != "lock"}
        print(json.dumps(report, indent=2), flush=True)
        # gradio_client keeps a reader thread per Client on its event stream, and interpreter exit
        # would wait on them: the report is out, so leave now.
        os._exit(0 if tally.valid_failed == 0 and tally.invalid_wrong == 0 else 1)
    if args.server_process and args.compare_allocator:
        reports = compare_allocators(args.clients, args.minutes, args.max_slope)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "soak-allocators.json").write_text(json.dumps(reports, indent=2))
        for name, report in reports.items():
            plot_rss(report, args.out / f"soak-allocators-{name}.png")
        summary = {
            name: {k: r[k] for k in ("valid_ok", "valid_failed", "rss_start_mb", "rss_end_mb")}
            | {"slope_last_half_mb_per_min": r["slope_last_half_mb_per_min"]}
            for name, r in reports.items()
        }
        print(json.dumps(summary, indent=2))
        return 0
    if args.server_process:
        report = soak_server_process(args.clients, args.minutes, args.max_slope)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "soak-server.json").write_text(json.dumps(report, indent=2))
        plot_rss(report, args.out / "soak-server.png")
        print(json.dumps({k: v for k, v in report.items() if k != "rss_series_mb"}, indent=2))
        return 0 if report["passed"] else 1
    report = soak(args.clients, args.seconds, args.max_requests, args.max_rss_growth_mb)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
