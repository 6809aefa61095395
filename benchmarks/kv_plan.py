"""Does the planner's KV cache arithmetic match the engine's real buffers, and memory a full pool?

    .venv/bin/python benchmarks/kv_plan.py      # writes benchmarks/results/kv_plan.{json,md}

For the built-in demo model and a random model of SmolLM2-135M's shape, in float32 and bfloat16:
the planner's KV bytes per token (backend.placement.sizes.kv_cache_bytes) against the bytes of the
buffers the engine really allocates for a request (backend.decode.batch_cache.RowKV); then the
process's resident memory while the engine holds a full pool of requests, against the pool's planned
bytes. Not a test: memory is the process's, and the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import psutil
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.decode.batch_cache import BatchCache, RowKV, use_row_attention  # noqa: E402
from backend.decode.engine import Engine, EngineLimits  # noqa: E402
from backend.models.demo_text import demo_text_model_dir  # noqa: E402
from backend.placement.sizes import kv_cache_bytes  # noqa: E402
from backend.settings import GenerationSettings  # noqa: E402
from benchmarks.serving import build_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def real_bytes_per_token(model, tokens: int) -> float:
    """Prefill `tokens` into a RowKV with room for exactly that many; its buffers' bytes per token."""
    use_row_attention(model)
    row = RowKV(tokens)
    cache = BatchCache([row])
    with torch.inference_mode():
        ids = torch.randint(4, 900, (1, tokens))
        model(
            input_ids=ids, position_ids=torch.arange(tokens)[None], past_key_values=cache, batch_cache=cache
        )
    buffers = [*row._keys.values(), *row._values.values()]
    return sum(b.numel() * b.element_size() for b in buffers) / tokens


def full_pool_memory(model, tokenizer, pool_tokens: int, need: int) -> dict:
    """RSS before and while the engine holds `pool_tokens // need` requests of `need` tokens each."""
    process = psutil.Process()
    engine = Engine(model, tokenizer, EngineLimits(max_batch_size=64, max_queue=64, kv_tokens=pool_tokens))
    prompt = [1] + [5] * (need - 9)
    settings = GenerationSettings(seed=1, max_new_tokens=8, mode="greedy")
    peak = [0]
    original = engine._decode_step

    def watch():  # on the engine thread, with every admitted request's buffers written
        peak[0] = max(peak[0], process.memory_info().rss)
        original()

    engine._decode_step = watch
    before = process.memory_info().rss
    handles = [engine.submit(prompt, settings) for _ in range(pool_tokens // need)]
    for handle in handles:
        list(handle)
    engine.close()
    return {
        "rss_before": before,
        "rss_peak": peak[0],
        "requests": len(handles),
        "reserved": engine.kv_usage(),
    }


def measure(name: str, model, tokenizer, dtype: torch.dtype) -> dict:
    planned = kv_cache_bytes(model.config, 1, 1, dtype.itemsize)
    real = real_bytes_per_token(model, 64)
    pool_tokens, need = 8 * 512, 512
    memory = full_pool_memory(model, tokenizer, pool_tokens, need)
    pool_bytes = planned * pool_tokens
    grown = memory["rss_peak"] - memory["rss_before"]
    return {
        "model": name,
        "dtype": str(dtype).removeprefix("torch."),
        "planned_bytes_per_token": planned,
        "real_bytes_per_token": real,
        "real_vs_planned": round(real / planned, 4),
        "pool_tokens": pool_tokens,
        "pool_bytes_planned": pool_bytes,
        "rss_growth_full_pool": grown,
        "rss_growth_vs_pool": round(grown / pool_bytes, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(demo_text_model_dir())
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        demo = AutoModelForCausalLM.from_pretrained(demo_text_model_dir(), dtype=dtype).eval()
        rows.append(measure("demo (tiny Llama)", demo, tokenizer, dtype))
        rows.append(measure("SmolLM2-135M shape", build_model("smollm2-135m", dtype), tokenizer, dtype))
        print(rows[-2], rows[-1], sep="\n", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kv_plan.json").write_text(json.dumps(rows, indent=2))
    lines = [
        "# KV cache: the plan against the real buffers",
        "",
        "Command: `.venv/bin/python benchmarks/kv_plan.py`",
        "",
        "| model | dtype | planned B/token | real B/token | real / planned | full pool (planned) "
        "| RSS growth | growth / pool |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['planned_bytes_per_token']:,} "
            f"| {r['real_bytes_per_token']:,.0f} "
            f"| {r['real_vs_planned']} | {r['pool_bytes_planned'] / 2**20:.1f} MiB | "
            f"{r['rss_growth_full_pool'] / 2**20:.1f} MiB | {r['rss_growth_vs_pool']} |"
        )
    (args.out / "kv_plan.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'kv_plan.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
