from __future__ import annotations

import copy
import re
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlavaConfig

from backend.placement.budgets import InvalidMemorySpec, parse_gpu_memory, parse_size
from backend.placement.planner import plan_device_map
from backend.placement.plans import DevicePlan
from backend.placement.sizes import ACTIVATION_HEADROOM_BYTES, kv_cache_bytes

GiB, MiB = 2**30, 2**20
HIDDEN, INTERMEDIATE, LAYERS, HEADS, VOCAB = 4096, 11008, 32, 32, 32000
# Parameters of one Llama-2-7B decoder layer, counted by hand.
LAYER_LINEAR_PARAMS = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE  # q, k, v, o + gate, up, down
LAYER_NORM_PARAMS = 2 * HIDDEN
EMBEDDING_PARAMS = VOCAB * HIDDEN


@pytest.fixture(scope="module")
def llama_7b() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        vocab_size=VOCAB,
        max_position_embeddings=4096,
    )


@pytest.fixture(scope="module")
def two_gpu_fp16_plan(llama_7b):
    budgets = {0: 8 * GiB, 1: 8 * GiB}
    kept = copy.deepcopy(budgets)
    plan = plan_device_map(llama_7b, "none", torch.float16, budgets, 64 * GiB, 4096)
    assert budgets == kept, "the caller's budgets were changed"
    return plan


MODULES = ["model.embed_tokens", *(f"model.layers.{i}" for i in range(LAYERS)), "model.norm", "lm_head"]


def placement(device_map: dict, module: str):
    """Where `module` goes: the entry for it or its nearest parent ("" is the whole model)."""
    owners = [k for k in device_map if k == "" or module == k or module.startswith(k + ".")]
    assert owners, f"{module} is not placed"
    return device_map[max(owners, key=len)]


def bytes_on(device_map: dict, device, linear_bytes: float, other_bytes: int) -> float:
    """Weight bytes placed on `device`, from the hand-counted parameter numbers."""
    sizes = {
        "model.embed_tokens": EMBEDDING_PARAMS * other_bytes,
        "lm_head": EMBEDDING_PARAMS * other_bytes,
        "model.norm": HIDDEN * other_bytes,
    }
    layer = LAYER_LINEAR_PARAMS * linear_bytes + LAYER_NORM_PARAMS * other_bytes
    return sum(sizes.get(m, layer) for m in MODULES if placement(device_map, m) == device)


def assert_whole_layers_in_order(device_map: dict) -> None:
    for key in device_map:
        assert not re.match(r"model\.layers\.\d+\.", key), f"{key} splits a decoder layer"
    rank = {0: 0, 1: 1, "cpu": 2, "disk": 3}
    order = [rank[placement(device_map, f"model.layers.{i}")] for i in range(LAYERS)]
    assert order == sorted(order), "layers go GPU 0, GPU 1, then CPU, then disk"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20GiB", 20 * GiB),
        ("500MB", 500 * 10**6),
        ("1.5 GiB", int(1.5 * GiB)),
        ("  7kib ", 7 * 1024),
        ("100", 100),
        ("3b", 3),
        ("2TiB", 2 * 2**40),
        (".5GiB", GiB // 2),
        ("8gb", 8 * 10**9),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["", "GiB", "-1GiB", "20XB", "20 GB extra", "1.2.3GB", ".", "twenty GiB", "1e3"]
)
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(InvalidMemorySpec, match="cannot read"):
        parse_size(text)


def test_parse_gpu_memory() -> None:
    assert parse_gpu_memory("0=20GiB,1=10GiB") == {0: 20 * GiB, 1: 10 * GiB}
    assert parse_gpu_memory(" 0 = 1GiB , ") == {0: GiB}
    assert parse_gpu_memory("3=512MiB") == {3: 512 * MiB}
    assert parse_gpu_memory("") == {}
    assert parse_gpu_memory(None) == {}


@pytest.mark.parametrize("spec", ["20GiB", "a=1GiB", "0=lots", "-1=1GiB", "0:1GiB", "0=1GiB;1=2GiB"])
def test_parse_gpu_memory_rejects(spec: str) -> None:
    with pytest.raises(InvalidMemorySpec):
        parse_gpu_memory(spec)


def test_kv_cache_bytes_by_hand(llama_7b) -> None:
    # Llama-2-7B, fp16, 4096 tokens: 2 (k, v) x 32 layers x 32 heads x 128 dims x 4096 x 2 bytes = 2 GiB.
    assert kv_cache_bytes(llama_7b, 4096, 1, 2) == 2 * GiB
    assert kv_cache_bytes(llama_7b, 1024, 3, 4) == 2 * 32 * 32 * 128 * 1024 * 3 * 4


def test_kv_cache_bytes_grouped_query_and_head_dim() -> None:
    gqa = LlamaConfig(hidden_size=2048, num_attention_heads=16, num_key_value_heads=4, num_hidden_layers=10)
    assert kv_cache_bytes(gqa, 100, 1, 2) == 2 * 10 * 4 * (2048 // 16) * 100 * 2
    explicit = SimpleNamespace(
        hidden_size=3072, num_attention_heads=16, num_key_value_heads=8, head_dim=256, num_hidden_layers=2
    )
    assert kv_cache_bytes(explicit, 10, 1, 2) == 2 * 2 * 8 * 256 * 10 * 2
    no_kv_heads = SimpleNamespace(hidden_size=64, num_attention_heads=4, num_hidden_layers=3)
    assert kv_cache_bytes(no_kv_heads, 5, 2, 4) == 2 * 3 * 4 * 16 * 5 * 2 * 4


def test_kv_cache_bytes_of_a_vision_model_uses_its_text_model(llama_7b) -> None:
    llava = LlavaConfig(text_config=llama_7b.to_dict())
    assert kv_cache_bytes(llava, 4096, 1, 2) == 2 * GiB


def test_fp16_7b_on_two_8gib_gpus(two_gpu_fp16_plan: DevicePlan) -> None:
    plan = two_gpu_fp16_plan
    places = set(plan.device_map.values())
    assert {0, 1} <= places
    assert_whole_layers_in_order(plan.device_map)
    # KV cache (2 GiB at 4096 tokens) is shared by budget: 1 GiB each, plus the activation headroom.
    assert plan.reserved == {0: ACTIVATION_HEADROOM_BYTES + GiB, 1: ACTIVATION_HEADROOM_BYTES + GiB}
    assert plan.budgets == {0: 8 * GiB, 1: 8 * GiB, "cpu": 64 * GiB}
    for gpu in (0, 1):
        assert bytes_on(plan.device_map, gpu, 2, 2) <= plan.budgets[gpu] - plan.reserved[gpu]
    # 12.55 GiB of weights + one request's KV cache (2 GiB) + activations (2 x 512 MiB) fit 16 GiB: the
    # room kept is one request's (batch size 1 here), so nothing lands on the CPU.
    assert places == {0, 1} and not plan.offloaded and plan.warnings == ()
    assert plan.kv_cache_tokens == 4096


def test_4bit_7b_fits_one_6gib_gpu(llama_7b) -> None:
    budgets = {0: 6 * GiB}
    plan = plan_device_map(llama_7b, "4bit", torch.float16, budgets, 64 * GiB, 2048)
    assert budgets == {0: 6 * GiB}
    assert set(plan.device_map.values()) == {0}
    assert not plan.offloaded and plan.warnings == ()
    assert_whole_layers_in_order(plan.device_map)
    # Linear weights at half a byte, embeddings, norms and lm_head in fp16: about 3.5 GiB.
    assert bytes_on(plan.device_map, 0, 0.5, 2) <= 6 * GiB - plan.reserved[0]


def test_fp16_7b_does_not_fit_one_6gib_gpu(llama_7b) -> None:
    plan = plan_device_map(llama_7b, "none", torch.float16, {0: 6 * GiB}, 64 * GiB, 2048)
    assert plan.offloaded
    assert_whole_layers_in_order(plan.device_map)
    assert bytes_on(plan.device_map, 0, 2, 2) <= 6 * GiB - plan.reserved[0]
    assert plan.warnings


def test_disk_offload_when_cpu_is_small(llama_7b) -> None:
    plan = plan_device_map(llama_7b, "none", torch.float16, {0: 2 * GiB}, 2 * GiB, 1024)
    assert "disk" in set(plan.device_map.values())
    assert plan.offloaded
    assert any("disk" in w for w in plan.warnings)
    assert_whole_layers_in_order(plan.device_map)


def test_no_gpus_means_cpu(llama_7b) -> None:
    plan = plan_device_map(llama_7b, "4bit", torch.float16, {}, 10 * GiB, 4096)
    assert plan.device_map == {"": "cpu"}
    assert not plan.offloaded
    assert plan.warnings == ()


@pytest.mark.parametrize(
    ("device_map", "offloaded"),
    [
        ({"": "cpu"}, False),
        ({"": 0}, False),
        ({"a": 0, "b": 1}, False),
        ({"a": 0, "b": "cpu"}, True),
        ({"a": 1, "b": "disk"}, True),
        ({"a": "cpu", "b": "disk"}, False),
    ],
)
def test_offloaded_semantics(device_map: dict, offloaded: bool) -> None:
    assert DevicePlan(device_map).offloaded is offloaded
