"""Serving benchmark: the anchors' serialised streaming vs one static batch vs our batching engine.

    .venv/bin/python benchmarks/serving.py            # full run, writes benchmarks/results/serving.*
    .venv/bin/python benchmarks/serving.py --quick    # fewer users and tokens, a smoke test

Random weights of SmolLM2-135M's shape (optionally Llama-3.2-1B's: --shape llama-1b); prompts are
random token ids, so only speed is measured. Everything runs side by side in one run; the main-thread
baseline runs in a child process, and every system here runs on threads that end (backend.torch_threads).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM, TextIteratorStreamer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.decode.engine import Engine, EngineLimits  # noqa: E402
from backend.models.demo_text import default_cache_root, demo_text_model_dir  # noqa: E402
from backend.models.packed_weights import pack_linears  # noqa: E402
from backend.models.row_kernels import KernelBuild, RowKernels  # noqa: E402
from backend.settings import GenerationSettings  # noqa: E402
from backend.torch_threads import call_on_fresh_thread  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
}
SAMPLING = dict(temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.0)
STAGGER = 0.25  # seconds between arrivals in the staggered 8-user scenario


@dataclass
class Run:
    """Timings of one scenario: every user's submit time, first-token time and token times."""

    tokens: int = 0
    wall: float = 0.0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "tokens": self.tokens,
            "seconds": round(self.wall, 3),
            "tok_per_s": round(self.tokens / self.wall, 2) if self.wall else 0.0,
            "ttft_p50_ms": pct(self.ttft, 50),
            "ttft_p95_ms": pct(self.ttft, 95),
            "itl_p50_ms": pct(self.itl, 50),
            "itl_p95_ms": pct(self.itl, 95),
        }


def pct(values: list[float], q: int) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] * 1000, 1)


def build_model(
    shape: str, dtype: torch.dtype, packed: bool = False, kernels: RowKernels | None = None
) -> LlamaForCausalLM:
    """Random weights of `shape`; `packed`: as the app loads it on a CPU (backend.models.packed_weights), for
    the row kernels where `kernels` are given (backend.models.row_kernels), for oneDNN otherwise."""
    config = LlamaConfig(
        **SHAPES[shape], max_position_embeddings=2048, bos_token_id=0, eos_token_id=1, pad_token_id=3
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = None  # random weights: every run makes all its tokens
    model = model.to(dtype).eval()
    if packed:
        print(f"  {pack_linears(model, kernels=kernels).text}", flush=True)
    return model


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every parameter, but only one row of an untied embedding."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    if model.get_output_embeddings().weight is not embedding:
        total -= embedding.numel() * embedding.element_size()
    return total


def memory_bandwidth(megabytes: int = 512, repeats: int = 5) -> dict:
    """This machine's memory speed, measured here on a buffer far beyond the caches: reading it (a sum) and
    copying it (bytes read plus written, as STREAM counts). A decode step only reads its weights, so the
    one-user limit is the read speed over the weights one token reads."""
    source = torch.rand(megabytes * 2**20 // 4)
    target = torch.empty_like(source)

    def rate(work, moved: int) -> float:
        work()
        best = min(timed(work) for _ in range(repeats))
        return moved / best / 1e9

    read = rate(source.sum, source.numel() * 4)
    copy = rate(lambda: target.copy_(source), 2 * source.numel() * 4)  # read + written
    return {"read_gb_s": round(read, 1), "copy_gb_s": round(copy, 1), "limit_gb_s": round(read, 1)}


def timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def prompts(users: int, length: int, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(users)
    return [[0] + torch.randint(4, vocab, (length - 1,), generator=generator).tolist() for _ in range(users)]


def in_threads(count: int, target, spacing: float = 0.0) -> float:
    """Start `count` users at once (or `spacing` seconds apart); the wall time until the last finishes."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    started = time.perf_counter()
    for index, thread in enumerate(threads):
        if index and spacing:
            time.sleep(spacing)
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def serialised(model, tokenizer, users: list[list[int]], new_tokens: int, spacing: float = 0.0) -> Run:
    """What the anchors do: one streamed generate() at a time under a global lock."""
    run, lock, record = Run(), threading.Lock(), threading.Lock()

    def user(index: int):
        submitted = time.perf_counter()
        with lock:
            streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
            ids = torch.tensor([users[index]])
            kwargs = dict(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=True,
                streamer=streamer,
                **SAMPLING,
            )
            worker = threading.Thread(target=model.generate, kwargs=kwargs)
            worker.start()
            stamps = [time.perf_counter() for _ in streamer]
            worker.join()
        with record:
            run.tokens += new_tokens
            if stamps:
                run.ttft.append(stamps[0] - submitted)
                run.itl.extend(b - a for a, b in zip(stamps, stamps[1:], strict=False))

    run.wall = in_threads(len(users), user, spacing)
    return run


def static_batch(model, users: list[list[int]], new_tokens: int) -> Run:
    """One generate() over all prompts at once: the throughput ceiling, but nobody can join."""
    ids = torch.tensor(users)
    started = time.perf_counter()
    # generate() turns gradients off itself; an inference_mode here would not reach its thread.
    call_on_fresh_thread(
        model.generate,
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=True,
        **SAMPLING,
    )
    wall = time.perf_counter() - started
    return Run(tokens=new_tokens * len(users), wall=wall, ttft=[wall] * len(users))


def transformers_continuous_batching(model, users: list[list[int]], new_tokens: int) -> Run:
    """transformers' own continuous batching (generate_batch): no streaming, one seed for all."""
    config = GenerationConfig(do_sample=True, max_new_tokens=new_tokens, **SAMPLING)
    started = time.perf_counter()
    outputs = call_on_fresh_thread(
        model.generate_batch, users, generation_config=config, max_new_tokens=new_tokens, warmup=False
    )
    wall = time.perf_counter() - started
    tokens = sum(len(output.generated_tokens) for output in outputs.values())
    return Run(tokens=tokens, wall=wall, ttft=[wall] * len(users))


def engine_run(engine: Engine, users: list[list[int]], new_tokens: int, spacing: float = 0.0) -> Run:
    run, record = Run(), threading.Lock()

    def user(index: int):
        settings = GenerationSettings(seed=index, max_new_tokens=new_tokens, **SAMPLING)
        submitted = time.perf_counter()
        stamps = []
        count = 0
        for update in engine.submit(users[index], settings):
            if update.queue_position is None:
                stamps.append(time.perf_counter())
                count = update.new_tokens
        with record:
            run.tokens += count
            run.ttft.append(stamps[0] - submitted)
            run.itl.extend(b - a for a, b in zip(stamps, stamps[1:], strict=False))

    run.wall = in_threads(len(users), user, spacing)
    return run


def raw_generate(model, prompt: list[int], new_tokens: int, in_thread: bool = True) -> float:
    """Tokens per second of one plain generate(), on a thread that ends or in the calling thread."""
    ids = torch.tensor([prompt])

    def job() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=True,
                **SAMPLING,
            )
        return new_tokens / (time.perf_counter() - started)

    return call_on_fresh_thread(job) if in_thread else job()


def prefill_seconds(model, users: list[list[int]], repeats: int) -> float:
    """One forward pass over all prompts (what the first token of each waits for), median of repeats."""
    ids = torch.tensor(users)

    def once() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
        return time.perf_counter() - started

    once()  # warm-up
    return best_of(repeats, once)


def main_thread_baselines(
    shape: str, dtype: str, threads: int, new_tokens: int, prompt_len: int, repeats: int
):
    """In a child process (its main thread keeps an OpenMP team for good, which would slow every
    later measurement here): raw generate() in the main thread, then in a worker thread beside it,
    which is how the bf16 worker-thread slowdown looked before backend.torch_threads."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(_main_thread_child, (shape, dtype, threads, new_tokens, prompt_len, repeats))


def _main_thread_child(shape, dtype, threads, new_tokens, prompt_len, repeats) -> tuple[float, float]:
    torch.set_num_threads(threads)
    model = build_model(shape, getattr(torch, dtype))
    prompt = prompts(1, prompt_len, model.config.vocab_size)[0]
    raw_generate(model, prompt, 8, in_thread=False)  # warm-up
    main = best_of(repeats, lambda: raw_generate(model, prompt, new_tokens, in_thread=False))
    beside = best_of(repeats, lambda: raw_generate(model, prompt, new_tokens, in_thread=True))
    return main, beside


def best_of(repeats: int, measure):
    """Median of a few repeats: this machine is shared and noisy."""
    return statistics.median(measure() for _ in range(repeats))


def measure_dtype(
    shape: str,
    dtype: torch.dtype,
    user_counts: list[int],
    new_tokens: int,
    prompt_len: int,
    repeats: int,
    bandwidth: dict,
    kernels: RowKernels | None,
) -> dict:
    """Every system, one at a time, with no OpenMP team left behind by the one before."""
    name = str(dtype).removeprefix("torch.")
    main, beside = main_thread_baselines(
        shape, name, torch.get_num_threads(), new_tokens, prompt_len, repeats
    )
    model = call_on_fresh_thread(build_model, shape, dtype)
    # The engine runs the model as the app loads it on a CPU: linear layers on packed weights, for the row
    # kernels where this CPU has them (else oneDNN, and no engine_onednn arm). The anchors (serialised
    # generate, static batch) run plain transformers, as they do.
    packed = call_on_fresh_thread(build_model, shape, dtype, True, kernels)
    onednn = call_on_fresh_thread(build_model, shape, dtype, True) if kernels is not None else None
    tokenizer = AutoTokenizer.from_pretrained(
        demo_text_model_dir(Path(tempfile.gettempdir()) / "bench-cache")
    )
    vocab = model.config.vocab_size
    warm = prompts(1, prompt_len, vocab)[0]
    raw_generate(model, warm, 8)  # warm-up
    out: dict = {"dtype": name, "scenarios": {}}
    out["weight_bytes_per_token"] = weight_bytes_per_token(model)
    out["bandwidth_limit_tok_s"] = round(bandwidth["limit_gb_s"] * 1e9 / out["weight_bytes_per_token"], 1)
    out["raw_main_tok_s"] = round(main, 2)
    out["raw_thread_tok_s"] = round(best_of(repeats, lambda: raw_generate(model, warm, new_tokens)), 2)
    out["raw_thread_beside_main_team_tok_s"] = round(beside, 2)
    for users in user_counts:
        batch = prompts(users, prompt_len, vocab)
        row = {}
        # The app's default batch (8), or all users at once beyond it; with invariance every decode step
        # has that many rows, without it only the rows in use (--no-batch-invariance).
        arms = [("engine", True, packed, True), ("engine_no_invariance", False, packed, True)]
        if users in (1, 8):
            # Decoding through transformers' forward on packed weights (--no-fused-decode), and on
            # PyTorch's default kernels (--no-packed-weights, where no fused step applies).
            arms.append(("engine_transformers_step", True, packed, False))
            arms.append(("engine_unpacked", True, model, True))
            if onednn is not None:  # the same engine on oneDNN's kernels (--no-row-kernels)
                arms.append(("engine_onednn", True, onednn, True))
        for system, invariant, engine_model, fused in arms:
            limits = EngineLimits(
                max_batch_size=max(8, users), max_queue=64, batch_invariant=invariant, fused_decode=fused
            )
            # A fresh engine per scenario: its thread (and OpenMP team) ends before the next system runs.
            engine = Engine(engine_model, tokenizer, limits)
            try:
                engine_run(engine, prompts(1, prompt_len, vocab), 8)  # warm-up
                # One user is compared with a median of raw generate() runs: give it as many.
                runs = [
                    engine_run(engine, batch, new_tokens).summary()
                    for _ in range(repeats if users == 1 else 1)
                ]
                row[system] = sorted(runs, key=lambda run: run["tok_per_s"])[len(runs) // 2]
            finally:
                engine.close()
        row["serialised"] = serialised(model, tokenizer, batch, new_tokens).summary()
        if users == 8:
            # Users who come one after another instead of all at once: each joins the running batch.
            engine = Engine(packed, tokenizer, EngineLimits(max_batch_size=8, max_queue=64))
            try:
                row["engine_staggered"] = engine_run(engine, batch, new_tokens, STAGGER).summary()
            finally:
                engine.close()
            row["serialised_staggered"] = serialised(model, tokenizer, batch, new_tokens, STAGGER).summary()
            row["static_batch"] = static_batch(model, batch, new_tokens).summary()
            out["prefill_ms"] = {
                str(n): round(call_on_fresh_thread(prefill_seconds, model, batch[:n], repeats) * 1000, 1)
                for n in (1, 8)
            }
            try:
                row["transformers_cb"] = transformers_continuous_batching(model, batch, new_tokens).summary()
            except Exception as error:  # reported, not fatal: it is the alternative under evaluation
                out["transformers_cb_error"] = f"{type(error).__name__}: {error}"
        out["scenarios"][str(users)] = row
        print(
            f"  {name} {users:>2} users: "
            + ", ".join(f"{system} {result['tok_per_s']} tok/s" for system, result in row.items()),
            flush=True,
        )
    return out


def ratios(result: dict) -> dict:
    scenarios = result["scenarios"]
    eight, one = scenarios.get("8"), scenarios.get("1")
    found = {}
    if eight:
        found["engine_8_vs_serialised"] = eight["engine"]["tok_per_s"] / eight["serialised"]["tok_per_s"]
        found["engine_8_vs_static_batch_8"] = (
            eight["engine"]["tok_per_s"] / eight["static_batch"]["tok_per_s"]
        )
    if one:
        found["engine_1_vs_raw_generate"] = one["engine"]["tok_per_s"] / result["raw_main_tok_s"]
        found["engine_1_vs_bandwidth_limit"] = one["engine"]["tok_per_s"] / result["bandwidth_limit_tok_s"]
        # A lone user's first token against raw generate()'s (streamed, one user: the serialised row).
        found["ttft_1_vs_raw_generate"] = one["engine"]["ttft_p50_ms"] / one["serialised"]["ttft_p50_ms"]
    for users, row in scenarios.items():  # what oneDNN's packed weights bring to the engine
        if "engine_unpacked" in row:
            found[f"packed_{users}_tok_s_ratio"] = (
                row["engine"]["tok_per_s"] / row["engine_unpacked"]["tok_per_s"]
            )
    for users, row in scenarios.items():  # what the row kernels bring over oneDNN's
        if "engine_onednn" in row:
            found[f"row_kernels_{users}_tok_s_ratio"] = (
                row["engine"]["tok_per_s"] / row["engine_onednn"]["tok_per_s"]
            )
    for users, row in scenarios.items():  # what the fused decode step brings over transformers' forward
        if "engine_transformers_step" in row:
            found[f"fused_{users}_tok_s_ratio"] = (
                row["engine"]["tok_per_s"] / row["engine_transformers_step"]["tok_per_s"]
            )
    for users, row in scenarios.items():  # what batch invariance costs: invariant tok/s over not
        found[f"invariance_{users}_tok_s_ratio"] = (
            row["engine"]["tok_per_s"] / row["engine_no_invariance"]["tok_per_s"]
        )
    if eight and one:
        found["ttft_p95_8_vs_ttft_1"] = eight["engine"]["ttft_p95_ms"] / one["engine"]["ttft_p95_ms"]
        found["ttft_p95_8_staggered_vs_ttft_1"] = (
            eight["engine_staggered"]["ttft_p95_ms"] / one["engine"]["ttft_p95_ms"]
        )
    if "prefill_ms" in result:  # 8 users who arrive together cannot see a first token before this
        found["prefill_8_vs_prefill_1"] = result["prefill_ms"]["8"] / result["prefill_ms"]["1"]
    found["raw_thread_vs_main"] = result["raw_thread_tok_s"] / result["raw_main_tok_s"]
    found["raw_thread_beside_main_team_vs_main"] = (
        result["raw_thread_beside_main_team_tok_s"] / result["raw_main_tok_s"]
    )
    return {name: round(value, 2) for name, value in found.items()}


TARGETS = {
    "invariance_8_tok_s_ratio": (">=", 0.9),
    "engine_8_vs_serialised": (">=", 4.0),
    "engine_8_vs_static_batch_8": (">=", 1.5),
    "engine_1_vs_raw_generate": (">=", 1.5),
    "engine_1_vs_bandwidth_limit": (">=", 0.6),
    "ttft_1_vs_raw_generate": ("<=", 1.0),
    "ttft_p95_8_vs_ttft_1": ("<=", 3.0),
}


def markdown(report: dict) -> str:
    lines = [
        f"# Serving benchmark ({report['shape']}, {report['new_tokens']} new tokens, "
        f"{report['threads']} threads)",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Linear kernels: {report.get('row_kernels', 'oneDNN')} (engine_onednn: the same engine, oneDNN's).",
        "",
    ]
    bandwidth = report["bandwidth"]
    for result in report["results"]:
        lines += [
            f"## {result['dtype']}",
            "",
            "| users | system | tok/s | TTFT p50 / p95 ms | ITL p50 / p95 ms |",
            "|---|---|---|---|---|",
        ]
        for users, row in result["scenarios"].items():
            for name, r in row.items():
                lines.append(
                    f"| {users} | {name} | {r['tok_per_s']} | {r['ttft_p50_ms']} / {r['ttft_p95_ms']} | "
                    f"{r['itl_p50_ms']} / {r['itl_p95_ms']} |"
                )
        lines += [
            "",
            f"Weights read per token: {result['weight_bytes_per_token'] / 2**20:,.0f} MiB; at this machine's "
            f"{bandwidth['limit_gb_s']} GB/s (measured here: read {bandwidth['read_gb_s']}, "
            f"copy {bandwidth['copy_gb_s']}) one user can get at most "
            f"{result['bandwidth_limit_tok_s']} tok/s.",
            "",
            f"Raw generate, one user: main thread {result['raw_main_tok_s']} tok/s (own process), "
            f"a thread that ends {result['raw_thread_tok_s']} tok/s, a worker thread while the "
            f"main thread keeps an OpenMP team {result['raw_thread_beside_main_team_tok_s']} tok/s.",
            ""
            if "prefill_ms" not in result
            else f"One forward pass over the prompts: 1 prompt {result['prefill_ms']['1']} ms, "
            f"8 prompts {result['prefill_ms']['8']} ms. Staggered: users arrive {STAGGER} s apart.",
            "",
            "| ratio | measured | target |",
            "|---|---|---|",
        ]
        for name, value in result["ratios"].items():
            target = TARGETS.get(name)
            lines.append(f"| {name} | {value} | {' '.join(map(str, target)) if target else ''} |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Aggregate tok/s per user count, engine vs serialised, one panel per dtype (Pillow only)."""
    from PIL import Image, ImageDraw

    panels = report["results"]
    width, height = 420 * len(panels), 300
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    colours = {
        "engine": (249, 115, 22),
        "serialised": (120, 130, 145),
        "static_batch": (59, 130, 246),
        "transformers_cb": (34, 160, 90),
    }
    for p, result in enumerate(panels):
        left = 420 * p + 40
        top_value = max(r["tok_per_s"] for row in result["scenarios"].values() for r in row.values()) or 1
        draw.text((left, 8), f"{report['shape']} {result['dtype']}: aggregate tok/s", fill="black")
        for i, (users, row) in enumerate(result["scenarios"].items()):
            for j, name in enumerate(n for n in row if n in colours):  # users arriving together
                x = left + i * 90 + j * 24
                bar = int(220 * row[name]["tok_per_s"] / top_value)
                draw.rectangle([x, 260 - bar, x + 20, 260], fill=colours[name])
            draw.text((left + i * 90, 268), f"{users} users", fill="black")
        for k, (name, colour) in enumerate(colours.items()):
            draw.rectangle([left + k * 95, 284, left + k * 95 + 10, 294], fill=colour)
            draw.text((left + k * 95 + 14, 283), name, fill="black")
    image.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--users", default="1,4,8,16")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the single-user raw measurements")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="1 and 8 users, 16 tokens, fp32: a smoke test")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--no-row-kernels", action="store_true", help="the engine on oneDNN, as the app's flag"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.dtypes, args.users, args.new_tokens, args.repeats = "float32", "1,8", 16, 1
    torch.set_num_threads(args.threads)
    users = [int(u) for u in args.users.split(",")]
    report = {
        "shape": args.shape,
        "new_tokens": args.new_tokens,
        "prompt_tokens": args.prompt_tokens,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "command": " ".join(
            ["python", "benchmarks/serving.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "results": [],
    }
    # On a thread that ends: an OpenMP team kept by this main thread would slow every later measurement.
    report["bandwidth"] = call_on_fresh_thread(memory_bandwidth)
    print("memory:", report["bandwidth"], flush=True)
    build = KernelBuild(default_cache_root() / "kernels", enabled=not args.no_row_kernels).start()
    kernels = build.kernels(wait=900)  # as the app, once built (cached across runs)
    report["row_kernels"] = build.text()
    print(build.text(), flush=True)
    for name in args.dtypes.split(","):
        print(f"{args.shape} {name}:", flush=True)
        result = measure_dtype(
            args.shape,
            getattr(torch, name),
            users,
            args.new_tokens,
            args.prompt_tokens,
            args.repeats,
            report["bandwidth"],
            kernels,
        )
        result["ratios"] = ratios(result)
        print("  ratios:", result["ratios"], flush=True)
        report["results"].append(result)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "serving-quick" if args.quick else "serving"
    if args.shape != "smollm2-135m":  # other shapes beside the default's results, not over them
        stem += f"-{args.shape}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (args.out / f"{stem}.md").write_text(markdown(report))
    plot(report, args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.json, .md, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
