"""KV pools sized from what the weights leave: the GPUs people have, planned at default flags the way
`app.py --plan` plans them (shipped configs, meta device, hypothetical GPUs)."""

from __future__ import annotations

import json
import re

import pytest

import backend.models.loading as loading
from backend.config import parse_config
from backend.models.configs import load_config
from backend.models.loading import plan_placement, plan_report, plan_specs, with_joint_plan
from backend.placement.kv_pool import KVNeed, size_pools
from backend.placement.plans import JointPlan, size_text

GiB, MiB = 2**30, 2**20
VICUNA_7B, BLIP2_OPT = "lmsys/vicuna-7b-v1.5", "Salesforce/blip2-opt-2.7b"
VICUNA_TOKEN = 2 * 32 * 32 * 128 * 2  # K and V, 32 layers x 32 heads x 128 dims, fp16: 0.5 MiB a token
VICUNA_LAYER_TOKEN = VICUNA_TOKEN // 32
T4 = ["--model", VICUNA_7B, "--quantization", "4bit", "--vision-model", BLIP2_OPT]
T4 += ["--vision-quantization", "4bit", "--gpu-memory", "0=15GiB", "--cpu-memory", "15GiB"]
ALONE_4BIT = ["--model", VICUNA_7B, "--quantization", "4bit", "--vision-model", "none"]
ALONE_FP16 = ["--model", VICUNA_7B, "--quantization", "none", "--vision-model", "none"]
SCENARIOS = {
    "t4": T4,
    "one 12 GiB GPU": [*ALONE_4BIT, "--gpu-memory", "0=12GiB", "--cpu-memory", "15GiB"],
    "two 8 GiB GPUs": [*ALONE_FP16, "--gpu-memory", "0=8GiB,1=8GiB", "--cpu-memory", "15GiB"],
    "8 GiB GPU + 32 GiB RAM": [*ALONE_FP16, "--gpu-memory", "0=8GiB", "--cpu-memory", "32GiB"],
    "4 GiB GPU + 4 GiB RAM": ["--gpu-memory", "0=4GiB", "--cpu-memory", "4GiB"],  # GPU defaults
}
_plans: dict[tuple, JointPlan] = {}


def flag_specs(argv: list[str], has_gpu: bool = True) -> dict:
    """The specs `app.py --plan` builds from these flags (every other flag at its default)."""
    from app import model_spec

    config = parse_config(argv, has_gpu=has_gpu, env={})
    specs = {"text": model_spec(config, config.model, config.quantization)}
    if config.vision_model:
        specs["vision"] = model_spec(config, config.vision_model, config.vision_quantization)
    return specs


def flag_plan(argv: list[str]) -> JointPlan:
    if tuple(argv) not in _plans:
        _plans[tuple(argv)] = plan_specs(flag_specs(argv), hypothetical_gpus=True)
    return _plans[tuple(argv)]


def places(plan: JointPlan, role: str) -> set[str]:
    return set(plan.to_json()["models"][[m.role for m in plan.models].index(role)]["device_map"].values())


def free(plan: JointPlan, device) -> int:
    use = plan.devices[device]
    return use.budget_bytes - use.planned_bytes - use.reserved_bytes


def assert_within_budgets(plan: JointPlan) -> None:
    for device in plan.devices:
        assert device == "disk" or free(plan, device) >= 0, device


# ----------------------------------------------------------------------------- the GPUs people have


def test_t4_holds_both_4bit_models_whole_with_room_for_two_chats() -> None:
    plan = flag_plan(T4)
    assert plan.fits and places(plan, "text") == places(plan, "vision") == {"0"}
    assert plan.model("text").device_map == {"": 0} and plan.model("vision").device_map == {"": 0}
    text, vision = plan.model("text").kv_cache, plan.model("vision").kv_cache
    assert text.context_length == 4096 and vision.context_length == 2048  # the models' own windows
    assert text.max_concurrency >= 2 and text.tokens >= 2 * 4096
    assert vision.max_concurrency >= 1
    assert_within_budgets(plan)
    # The pools are kept on GPU 0 with one prefill's activations each (512 MiB headroom for both).
    assert plan.devices[0].reserved_bytes == 2 * 512 * MiB + text.bytes + vision.bytes
    assert text.bytes == text.tokens * VICUNA_TOKEN
    # --plan says it, in text and in JSON, with the same numbers.
    shown = plan.to_text()
    for pool in (text, vision):
        assert f"KV cache: {pool.tokens:,} tokens ({size_text(pool.bytes)}), room for " in shown
        assert (
            f"{pool.max_concurrency:.2f} full-context requests ({pool.context_length:,} tokens each)" in shown
        )
    data = json.loads(plan_report(flag_specs(T4), as_json=True))
    assert [m["kv_cache"] for m in data["models"]] == [
        {"tokens": p.tokens, "bytes": p.bytes, "max_concurrency": p.max_concurrency} for p in (text, vision)
    ]


def test_two_models_on_one_gpu_share_its_room_evenly() -> None:
    # Both grow by the same fraction of the way to their cap: with one --max-batch-size, one concurrency.
    plan = flag_plan(T4)
    text, vision = plan.model("text").kv_cache, plan.model("vision").kv_cache
    assert text.max_concurrency < 8 and abs(text.max_concurrency - vision.max_concurrency) <= 0.01
    # Neither could take one more token: the GPU's room went to the pools.
    assert 0 <= free(plan, 0) < VICUNA_TOKEN + vision.bytes // vision.tokens


def test_pools_share_by_fraction_of_their_want_and_pass_on_what_one_cannot_use() -> None:
    # One device: 4200 bytes left; wants 700 x 10 and 350 x 4 bytes: both get half of theirs.
    even = size_pools({"text": KVNeed(100, 800, {0: 10}), "vision": KVNeed(50, 400, {0: 4})}, {0: 4200})
    assert (even["text"].tokens, even["vision"].tokens) == (450, 225)
    assert even["text"].max_concurrency == even["vision"].max_concurrency == 4.5
    # The chat model's cache also sits on a tight GPU 0: it stops there, the vision model takes GPU 1.
    needs = {"text": KVNeed(100, 800, {0: 10, 1: 10}), "vision": KVNeed(100, 800, {1: 5})}
    passed_on = size_pools(needs, {0: 1000, 1: 10_000})
    assert passed_on["text"].tokens == 200 and passed_on["text"].bytes == 200 * 20
    assert passed_on["vision"].tokens == 800  # its cap: 700 x 5 bytes fit in what GPU 1 has left
    # Over budget (a model that did not fit): one request, no more, never less.
    assert size_pools({"text": KVNeed(100, 800, {"cpu": 10})}, {"cpu": -5})["text"].tokens == 100


def test_one_12gib_gpu_holds_vicuna_4bit_whole_with_room_for_two_chats() -> None:
    plan = flag_plan(SCENARIOS["one 12 GiB GPU"])
    assert plan.fits and plan.model("text").device_map == {"": 0}
    assert plan.model("text").kv_cache.max_concurrency >= 2
    assert_within_budgets(plan)
    assert 0 <= free(plan, 0) < VICUNA_TOKEN  # below its cap, the pool takes what the weights leave


def test_two_8gib_gpus_split_vicuna_fp16_by_whole_layers_and_hold_a_request() -> None:
    plan = flag_plan(SCENARIOS["two 8 GiB GPUs"])
    device_map = plan.model("text").device_map
    assert plan.fits and set(device_map.values()) == {0, 1}  # nothing on CPU or disk
    assert not any(re.search(r"layers\.\d+\.", key) for key in device_map)
    assert plan.devices["cpu"].planned_bytes == plan.devices["cpu"].reserved_bytes == 0
    assert plan.model("text").kv_cache.max_concurrency >= 1
    assert_within_budgets(plan)
    # Each GPU holds the cache of its own layers; the tighter one sets the pool: it has no token's room left.
    layers = {
        gpu: sum(1 for i in range(32) if loading_place(device_map, f"model.layers.{i}") == gpu)
        for gpu in (0, 1)
    }
    assert min(free(plan, gpu) - layers[gpu] * VICUNA_LAYER_TOKEN for gpu in (0, 1)) < 0


def loading_place(device_map: dict, name: str):
    owners = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
    return device_map[max(owners, key=len)]


def test_8gib_gpu_and_32gib_ram_run_vicuna_fp16_on_gpu_and_cpu_never_disk() -> None:
    plan = flag_plan(SCENARIOS["8 GiB GPU + 32 GiB RAM"])
    assert plan.fits and set(plan.model("text").device_map.values()) == {0, "cpu"}
    assert plan.devices["cpu"].reserved_bytes == 0  # offloaded layers run on GPU 0: their cache is there
    assert plan.model("text").kv_cache.max_concurrency >= 1
    assert_within_budgets(plan)


@pytest.mark.parametrize(
    ("flags", "quantize"),
    [([], None), (["--quantization", "none", "--vision-quantization", "none"], "--quantization 4bit")],
)
def test_4gib_gpu_and_4gib_ram_do_not_fit_and_say_what_to_change(flags: list[str], quantize) -> None:
    plan = plan_specs(flag_specs([*SCENARIOS["4 GiB GPU + 4 GiB RAM"], *flags]), hypothetical_gpus=True)
    assert not plan.fits and plan.to_json()["fits"] is False
    first = plan.warnings[0]
    missing = plan.devices["disk"].planned_bytes
    assert first.startswith(f"Does not fit: {missing / GiB:.2f} GiB more GPU or CPU memory is needed")
    assert "--gpu-memory/--cpu-memory" in first and "--context-length" in first
    assert "--max-batch-size" not in first  # the cap of the pools no longer takes room from the weights
    assert (quantize in first) if quantize else ("quantiz" not in first)


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_cpu_defaults_plan_within_16gib_of_ram(monkeypatch: pytest.MonkeyPatch, fast_bf16: bool) -> None:
    monkeypatch.setattr(loading, "visible_gpu_budgets", lambda: {})  # a free CPU Space: no GPU
    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda: fast_bf16)  # fp32 without bf16 instructions
    plan = plan_specs(flag_specs(["--cpu-memory", "16GiB"], has_gpu=False))
    assert [m.name for m in plan.models] == [
        "HuggingFaceTB/SmolLM2-360M-Instruct",
        "llava-hf/llava-interleave-qwen-0.5b-hf",
    ]
    assert plan.fits and plan.warnings == ()
    assert all(m.device_map == {"": "cpu"} and m.kv_cache.max_concurrency >= 1 for m in plan.models)
    assert_within_budgets(plan)


# ----------------------------------------------------------------------------- the pool's rules


@pytest.mark.parametrize("name", [*SCENARIOS, "no room to spare"])
def test_a_placed_model_always_holds_one_full_context_request(name: str) -> None:
    argv = SCENARIOS.get(name) or [*T4[:-4], "--gpu-memory", "0=3GiB", "--cpu-memory", "1GiB"]
    plan = flag_plan(argv)
    for m in plan.models:
        assert m.kv_cache.tokens >= m.kv_cache.context_length and m.kv_cache.max_concurrency >= 1, m.role
        assert m.kv_cache.tokens <= 8 * m.kv_cache.context_length  # never beyond --max-batch-size requests


def test_the_pool_is_capped_at_max_batch_size_requests() -> None:
    roomy = [*ALONE_4BIT, "--gpu-memory", "0=80GiB", "--cpu-memory", "15GiB"]
    assert flag_plan(roomy).model("text").kv_cache.tokens == 8 * 4096
    three = flag_plan([*roomy, "--max-batch-size", "3", "--context-length", "1000"]).model("text").kv_cache
    assert (three.tokens, three.bytes, three.max_concurrency) == (3000, 3000 * VICUNA_TOKEN, 3.0)


def test_loading_takes_the_pool_that_plan_prints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "gpu_budgets", lambda spec, hypothetical: ({0: 15 * GiB}, []))  # a T4 here
    specs = flag_specs(T4)
    printed = json.loads(plan_report(specs, as_json=True))
    planned = with_joint_plan(specs)
    for role, model in zip(("text", "vision"), printed["models"], strict=True):
        assert planned[role].planned.kv_cache_tokens == model["kv_cache"]["tokens"]
    plan, _, _ = plan_placement(planned["text"], load_config(VICUNA_7B))
    assert plan is planned["text"].planned
    view = plan.joint.view()
    assert [m["kv_cache"]["tokens"] for m in view["models"]] == [
        m["kv_cache"]["tokens"] for m in printed["models"]
    ]
    assert {"fits", "warnings", "devices"} <= set(view)
