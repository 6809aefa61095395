"""The joint device planner on the presets' real shapes (meta device, hypothetical GPUs), and loading
the tiny demo model through a plan with CPU and disk offload."""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
from transformers.integrations.accelerate import expand_device_map

from backend.models.configs import config_path, load_config, shipped_names
from backend.models.hub import ModelUnavailable
from backend.models.loading import ModelSpec, load_text_model, plan_placement, plan_specs, with_joint_plan
from backend.placement.planner import ModelRequest, collapse_device_map, plan_models
from backend.placement.plans import JointPlan, shorten_ranges
from backend.placement.sizes import meta_model_from_config, model_units, tensor_bytes
from ui.system_tab import plan_html

GiB = 2**30
VICUNA_7B, VICUNA_13B = "lmsys/vicuna-7b-v1.5", "lmsys/vicuna-13b-v1.5"
BLIP2_OPT, LLAVA_13B = "Salesforce/blip2-opt-2.7b", "llava-hf/llava-1.5-13b-hf"
PRESETS = {  # name -> parameters (billions) as published, counting tied copies as the meta model holds them
    VICUNA_7B: 6.74,
    VICUNA_13B: 13.02,
    "meta-llama/Llama-2-7b-chat-hf": 6.74,
    BLIP2_OPT: 3.87,
    "Salesforce/blip2-flan-t5-xl": 3.94 + 2 * 32128 * 2048 / 1e9,  # + T5's encoder/decoder embedding copies
    "Salesforce/instructblip-vicuna-7b": 7.91,
    "llava-hf/llava-1.5-7b-hf": 7.06,
    LLAVA_13B: 13.35,
}
# Vicuna-7B by hand: 32 layers of q, k, v, o (4096 x 4096) and gate, up, down (4096 x 11008).
LINEAR_SHAPES = 32 * ([(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)])
FP16_REST = 2 * (2 * 32000 * 4096 + (2 * 32 + 1) * 4096)  # embeddings, lm_head and norms in fp16
DECODER_LAYER = re.compile(r"layers\.\d+$")
DEEPER_THAN_A_LAYER = re.compile(r"layers\.\d+\.")


@pytest.fixture(scope="module")
def configs() -> dict:
    return {name: load_config(name) for name in PRESETS}


def request(configs, role, name, quantization="none", context=4096, dtype=torch.float16) -> ModelRequest:
    return ModelRequest(role, name, configs[name], quantization, dtype, context)


def place_of(device_map: dict, name: str):
    """Where `name` goes: its entry or its nearest parent's ("" is the whole model)."""
    owners = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
    return device_map[max(owners, key=len)]


def layer_places(device_map: dict, prefix: str = "model.layers", count: int = 32) -> list:
    return [place_of(device_map, f"{prefix}.{i}") for i in range(count)]


def assert_within_budgets(plan: JointPlan) -> None:
    for device, use in plan.devices.items():
        if device != "disk":
            assert use.planned_bytes + use.reserved_bytes <= use.budget_bytes, device


def quantized_bytes(shapes, quantization: str) -> int:
    """bitsandbytes' storage, counted independently: NF4 half a byte a weight + uint8 absmax per 64
    + fp32 absmax per 256 blocks; LLM.int8 a byte a weight + an fp32 scale per output row."""
    total = 0
    for rows, cols in shapes:
        n = rows * cols
        blocks = -(-n // 64)
        total += n // 2 + blocks + -(-blocks // 256) * 4 if quantization == "4bit" else n + rows * 4
    return total


# ----------------------------------------------------------------------------- configs


def test_every_preset_config_ships_with_real_shapes(configs) -> None:
    assert set(PRESETS) <= set(shipped_names())
    for name, billions in PRESETS.items():
        assert config_path(name).is_relative_to(Path(__file__).parent.parent / "assets" / "model_configs")
        vision = hasattr(configs[name], "vision_config")
        meta = meta_model_from_config(
            configs[name], AutoModelForImageTextToText if vision else AutoModelForCausalLM
        )
        assert sum(p.numel() for p in meta.parameters()) / 1e9 == pytest.approx(billions, rel=0.005), name


def test_config_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo_text_dir: Path) -> None:
    assert config_path(str(demo_text_dir)) == demo_text_dir / "config.json"  # a local directory first
    # Then the local Hugging Face cache, without the network.
    snapshot = tmp_path / "models--someorg--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((demo_text_dir / "config.json").read_text())
    (tmp_path / "models--someorg--tiny" / "refs").mkdir()
    (tmp_path / "models--someorg--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    assert config_path("someorg/tiny") == snapshot / "config.json"
    with pytest.raises(ModelUnavailable, match="no config for 'someorg/absent'.*lmsys/vicuna-7b-v1.5"):
        config_path("someorg/absent")


# ----------------------------------------------------------------------------- sizes


def test_4bit_and_8bit_sizes_by_hand(configs) -> None:
    for quantization in ("4bit", "8bit"):
        plan = plan_models([request(configs, "text", VICUNA_7B, quantization)], {0: 40 * GiB}, 64 * GiB, GiB)
        expected = quantized_bytes(LINEAR_SHAPES, quantization) + FP16_REST
        assert plan.devices[0].planned_bytes == pytest.approx(expected, abs=4096), quantization
        assert plan.model("text").total_bytes == plan.devices[0].planned_bytes


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_sizes_match_what_bitsandbytes_allocates(demo_text_dir: Path, quantization: str) -> None:
    from backend.models.loading import quantization_config

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # int8 on CPU warns at every matmul
    model = AutoModelForCausalLM.from_pretrained(
        demo_text_dir,
        dtype=torch.bfloat16,
        device_map={"": "cpu"},
        quantization_config=quantization_config(quantization, torch.bfloat16, False),
    )
    actual = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None:  # the per-block scales (the NF4 code table is one shared constant)
            actual += state.absmax.numel() * state.absmax.element_size()
            actual += state.state2.absmax.numel() * state.state2.absmax.element_size() if state.nested else 0
        if getattr(weight, "SCB", None) is not None:
            actual += weight.SCB.numel() * weight.SCB.element_size()
    meta = meta_model_from_config(model.config)
    planned = sum(u.resident_bytes for u in model_units(meta, quantization, torch.bfloat16, 0))
    assert planned == actual


def test_blip2_keeps_qformer_in_fp32_and_lm_head_tied(configs) -> None:
    meta = meta_model_from_config(configs[BLIP2_OPT], AutoModelForImageTextToText)
    sizes = tensor_bytes(meta, "4bit", torch.float16)
    query = sizes["qformer.encoder.layer.0.attention.attention.query.weight"]
    assert query == (768 * 768 * 4,) * 2  # fp32, not quantized
    vision_fc = sizes["vision_model.encoder.layers.0.mlp.fc1.weight"]
    assert vision_fc[0] < 6144 * 1408 and vision_fc[1] == 6144 * 1408 * 2  # quantized; fp16 when offloaded
    assert sizes["language_model.lm_head.weight"] == (0, 0)  # tied to the input embeddings: counted once


# ----------------------------------------------------------------------------- placement


def test_vicuna_7b_fp16_splits_over_two_8gib_gpus_by_whole_layers(configs) -> None:
    budgets = {0: 8 * GiB, 1: 8 * GiB}
    kept = copy.deepcopy(budgets)
    plan = plan_models([request(configs, "text", VICUNA_7B)], budgets, 64 * GiB, GiB)
    assert budgets == kept, "the caller's budgets were changed"
    device_map = plan.model("text").device_map
    assert not any(DEEPER_THAN_A_LAYER.search(key) for key in device_map)
    places = layer_places(device_map)
    assert places == sorted(places) and set(places) == {0, 1}
    assert abs(places.count(0) - places.count(1)) <= 2  # balanced
    assert plan.fits and not plan.warnings
    assert_within_budgets(plan)
    # Each GPU keeps the KV cache of its own layers: 2 x 32 heads x 128 x 4096 tokens x 2 bytes per layer.
    kv_per_layer = 2 * 32 * 128 * 4096 * 2
    for gpu in (0, 1):
        assert plan.devices[gpu].reserved_bytes == 512 * 2**20 + kv_per_layer * places.count(gpu)


def test_vicuna_7b_4bit_fits_one_6gib_gpu(configs) -> None:
    plan = plan_models(
        [request(configs, "text", VICUNA_7B, "4bit", context=2048)], {0: 6 * GiB}, 64 * GiB, GiB
    )
    assert plan.model("text").device_map == {"": 0}
    assert plan.fits and not plan.warnings
    # At the full 4096 tokens the KV cache grows by 1 GiB and the last layers go to the CPU.
    longer = plan_models([request(configs, "text", VICUNA_7B, "4bit")], {0: 6 * GiB}, 64 * GiB, GiB)
    assert "cpu" in longer.model("text").device_map.values()
    assert any("offloaded to CPU RAM" in w and "slower" in w for w in longer.warnings)
    assert_within_budgets(longer)


def test_13b_and_blip2_over_three_mixed_gpus(configs) -> None:
    budgets = {0: 24 * GiB, 1: 12 * GiB, 2: 8 * GiB}
    text, vision = request(configs, "text", VICUNA_13B), request(configs, "vision", BLIP2_OPT, context=2048)
    plan = plan_models([text, vision], budgets, 64 * GiB, GiB)
    assert plan.model("vision").device_map == {"": 1}  # whole, on the smallest GPU that holds it
    places = layer_places(plan.model("text").device_map, count=40)
    assert places == sorted(places) and set(places) == {0, 1, 2}
    assert not any(DEEPER_THAN_A_LAYER.search(key) for m in plan.models for key in m.device_map)
    assert plan.fits and not plan.warnings
    assert_within_budgets(plan)


def test_vision_whole_on_one_gpu_and_text_balanced_over_the_rest(configs) -> None:
    text = request(configs, "text", VICUNA_7B, "4bit")
    vision = request(configs, "vision", BLIP2_OPT, "4bit", context=2048)
    plan = plan_models([text, vision], {0: 8 * GiB, 1: 8 * GiB}, 64 * GiB, GiB)
    assert list(plan.model("vision").device_map.values()) in ([0], [1])
    assert set(layer_places(plan.model("text").device_map)) == {0, 1}
    assert plan.fits
    assert_within_budgets(plan)


def test_the_chat_model_keeps_the_gpus_and_the_vision_model_runs_on_cpu(configs) -> None:
    text, vision = request(configs, "text", VICUNA_7B), request(configs, "vision", BLIP2_OPT, context=2048)
    plan = plan_models([text, vision], {0: 8 * GiB, 1: 8 * GiB}, 64 * GiB, GiB)
    assert set(layer_places(plan.model("text").device_map)) == {0, 1}
    assert plan.model("vision").device_map == {"": "cpu"}
    assert any("vision model runs on the CPU" in w and "captions will be slow" in w for w in plan.warnings)


def test_a_split_vision_model_keeps_projector_and_embeddings_together(configs) -> None:
    vision = request(configs, "vision", LLAVA_13B)
    plan = plan_models([vision], {0: 10 * GiB, 1: 10 * GiB, 2: 10 * GiB}, 64 * GiB, GiB)
    device_map = plan.model("vision").device_map
    assert len(set(device_map.values())) > 1
    assert place_of(device_map, "model.multi_modal_projector.linear_2") == place_of(
        device_map, "model.language_model.embed_tokens"
    )
    assert any("does not fit whole on one device" in w for w in plan.warnings)
    # transformers reads the collapsed map the same way: every parameter lands where it was planned.
    meta = meta_model_from_config(configs[LLAVA_13B], vision.model_class)
    names = [name for name, _ in meta.named_parameters()]
    assert expand_device_map(device_map, names) == {n: place_of(device_map, n) for n in names}


def test_too_small_does_not_fit_and_says_how_much_is_missing(configs) -> None:
    plan = plan_models([request(configs, "text", VICUNA_13B)], {0: 4 * GiB}, 8 * GiB, 100 * GiB)
    assert not plan.fits
    missing = plan.devices["disk"].planned_bytes
    assert missing > 10 * GiB
    assert plan.warnings[0].startswith(f"Does not fit: {missing / GiB:.2f} GiB more GPU or CPU memory")
    # What to change; the room kept is one request's, so --max-batch-size is no longer the cause.
    assert "--quantization 4bit" in plan.warnings[0] and "--context-length" in plan.warnings[0]
    assert "--max-batch-size" not in plan.warnings[0]
    assert "disk" in set(plan.model("text").device_map.values())
    assert plan.to_json()["fits"] is False


def test_json_has_the_documented_shape(configs) -> None:
    text, vision = request(configs, "text", VICUNA_7B), request(configs, "vision", BLIP2_OPT, "4bit", 2048)
    data = json.loads(
        json.dumps(plan_models([text, vision], {0: 8 * GiB, 1: 8 * GiB}, 32 * GiB, GiB).to_json())
    )
    assert set(data) == {"devices", "models", "fits", "warnings"}
    assert list(data["devices"]) == ["0", "1", "cpu", "disk"]
    for use in data["devices"].values():
        assert set(use) == {"budget_bytes", "planned_bytes", "reserved_bytes"}
        assert all(isinstance(n, int) for n in use.values())
    assert [m["role"] for m in data["models"]] == ["text", "vision"]
    for model in data["models"]:
        # kv_cache was added to the contract (additive): the pool planned for the model.
        assert set(model) == {
            "role",
            "name",
            "dtype",
            "quantization",
            "total_bytes",
            "device_map",
            "kv_cache",
        }
        assert set(model["kv_cache"]) == {"tokens", "bytes", "max_concurrency"}
        assert isinstance(model["kv_cache"]["tokens"], int) and isinstance(model["kv_cache"]["bytes"], int)
        assert (
            isinstance(model["kv_cache"]["max_concurrency"], float)
            and model["kv_cache"]["max_concurrency"] >= 1
        )
        assert model["quantization"] in ("none", "8bit", "4bit") and model["dtype"] == "float16"
        assert set(model["device_map"].values()) <= {"0", "1", "cpu", "disk"}
    assert isinstance(data["fits"], bool) and all(isinstance(w, str) for w in data["warnings"])


def test_collapse_and_ranges() -> None:
    assigned = {"a.x": 0, "a.layers.0": 0, "a.layers.1": 0, "a.layers.10": 1, "a.norm": 1, "head": 1}
    collapsed = collapse_device_map(assigned)
    assert collapsed == {"a.x": 0, "a.layers.0": 0, "a.layers.1": 0, "a.layers.10": 1, "a.norm": 1, "head": 1}
    assert collapse_device_map({"a.x": 0, "a.y": 0, "b": 0}) == {"": 0}
    assert collapse_device_map({"a.x": 0, "a.y": 0, "b": 1}) == {"a": 0, "b": 1}
    assert shorten_ranges(["e", "l.0", "l.1", "l.2", "l.4", "n"]) == ["e", "l.0–2", "l.4", "n"]


# ----------------------------------------------------------------------------- loading through the plan


def test_loading_with_cpu_and_disk_offload_generates_the_same(
    demo_text_dir: Path, demo_model, tmp_path
) -> None:
    # With a CPU budget for the embeddings and one decoder layer, the rest goes to disk. One request at a
    # time, so that what the roomy plan reserves is what placement keeps (no pool grown beyond it).
    roomy = plan_specs(
        {"text": ModelSpec(str(demo_text_dir), dtype="float32", context_length=64, max_batch_size=1)}
    )
    units = model_units(meta_model_from_config(demo_model.config), "none", torch.float32, 0)
    cpu_budget = roomy.devices["cpu"].reserved_bytes + sum(u.resident_bytes for u in units[:2])
    cpu_budget += max(u.offloaded_bytes for u in units[2:])  # one disk part at a time is read into RAM
    spec = ModelSpec(
        str(demo_text_dir),
        dtype="float32",
        cpu_memory=str(cpu_budget),
        context_length=64,
        max_batch_size=1,
        offload_dir=str(tmp_path),
    )
    loaded = load_text_model(spec)
    device_map = loaded.plan.device_map
    assert place_of(device_map, "model.embed_tokens") == place_of(device_map, "model.layers.0") == "cpu"
    assert place_of(device_map, "model.layers.1") == place_of(device_map, "lm_head") == "disk"
    assert not loaded.plan.joint.fits and loaded.plan.joint.warnings[0].startswith("Does not fit")
    ids = torch.tensor([loaded.tokenizer("Hello there, how are")["input_ids"]])
    with torch.no_grad():
        offloaded = loaded.model.generate(ids, max_new_tokens=8, do_sample=False)
        in_memory = demo_model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(offloaded, in_memory)
    # The System tab's data: the plan per device with the memory in use now, drawn as bars.
    report = loaded.system_report()
    devices = {d["key"]: d for d in report["devices"]}
    assert set(devices) == {"cpu", "disk"} and devices["cpu"]["in_use_bytes"] > 0
    assert devices["disk"]["models"][0]["parts"] == [
        "model.layers.1",
        "model.norm",
        "model.rotary_emb",
        "lm_head",
    ]
    picture = plan_html(report)
    assert "Does not fit" in picture and "model.layers.1" in picture and "disk" in picture


def test_loaders_take_the_joint_plan_made_for_them(demo_text_dir: Path, demo_vision_dirs: dict) -> None:
    specs = {
        "text": ModelSpec(str(demo_text_dir), dtype="float32", cpu_memory="4GiB"),
        "vision": ModelSpec(str(demo_vision_dirs["demo:tiny-llava"]), dtype="float32", cpu_memory="4GiB"),
    }
    planned = with_joint_plan(specs)
    joint = planned["text"].planned.joint
    assert planned["vision"].planned.joint is joint and [m.role for m in joint.models] == ["text", "vision"]
    config = load_config(str(demo_text_dir))
    plan, dtype, notes = plan_placement(planned["text"], config)
    assert plan is planned["text"].planned and dtype == torch.float32 and notes == []
    # A spec whose plan was made for another model (the demo standing in) is planned afresh.
    other = ModelSpec(str(demo_vision_dirs["demo:tiny-llava"]), planned=planned["text"].planned)
    assert plan_placement(other, config)[0].joint is not joint
    assert with_joint_plan({"text": ModelSpec("someorg/not-here")}) == {"text": ModelSpec("someorg/not-here")}
