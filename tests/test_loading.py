from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from bitsandbytes.nn import Linear4bit, Linear8bitLt

import backend.models.loading as loading
from backend.decode.generation import stream_generate
from backend.models.demo_text import DEMO_TEXT_MODEL
from backend.models.loading import ModelSpec, choose_dtype, load_text_model, quantization_config
from backend.models.packed_weights import PackedLinear
from backend.settings import GenerationSettings

QUANTIZED_LINEAR = {"4bit": Linear4bit, "8bit": Linear8bitLt}


@pytest.fixture(autouse=True)
def quiet_bitsandbytes():
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)  # 8-bit on CPU warns at every matmul that it casts to fp16
    yield
    logger.setLevel(level)


@pytest.fixture
def demo_cache(demo_text_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the playground cache at the session's demo model, so nothing is rebuilt."""
    monkeypatch.setenv("PLAYGROUND_CACHE", str(demo_text_dir.parent.parent))
    return demo_text_dir


def linear_layers(model) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize(
    "quantization",
    ["none", pytest.param("4bit", marks=pytest.mark.slow), pytest.param("8bit", marks=pytest.mark.slow)],
)
def test_load_quantize_and_generate(demo_cache: Path, demo_model, quantization: str) -> None:
    stages: list[str] = []
    loaded = load_text_model(
        ModelSpec(DEMO_TEXT_MODEL, quantization=quantization, dtype="float32"),
        lambda stage, fraction: stages.append(stage),
    )
    assert loaded.path == demo_cache
    assert loaded.is_demo
    assert loaded.dtype == torch.float32
    assert loaded.plan.device_map == {"": "cpu"}
    assert loaded.context_window == demo_model.config.max_position_embeddings
    assert stages and any("demo" in s.lower() for s in stages)
    layers = linear_layers(loaded.model)
    reference = linear_layers(demo_model)
    assert set(layers) == set(reference)
    # bitsandbytes never quantizes the output head; on the CPU it runs oneDNN on packed weights
    assert type(layers["lm_head"]) is PackedLinear
    body = [name for name in layers if name != "lm_head"]
    assert len(body) == 2 * 7  # two decoder layers of q, k, v, o, gate, up, down
    if quantization == "none":
        assert all(type(layers[name]) is PackedLinear for name in body)
        stored = {name: param for name, param in loaded.model.state_dict().items() if not param.is_meta}
        assert len(stored) > 2 * 2  # norms, the embedding (a packed layer's plain weight is dropped)
        for name, param in stored.items():
            assert torch.equal(param, demo_model.state_dict()[name]), name
        ids = torch.tensor([[1, 5, 9, 14, 3]])
        with torch.inference_mode():  # the packed weights are the file's too
            assert torch.allclose(loaded.model(ids).logits, demo_model(ids).logits, atol=1e-4)
    else:
        kind = QUANTIZED_LINEAR[quantization]
        assert all(isinstance(layers[name], kind) for name in body)
        weight = layers["model.layers.0.self_attn.q_proj"].weight
        original = reference["model.layers.0.self_attn.q_proj"].weight
        assert weight.dtype in (torch.uint8, torch.int8)  # stored quantized, not as floats
        assert weight.numel() * weight.element_size() < original.numel() * original.element_size() / 3
    ids = loaded.tokenizer("Hello there", add_special_tokens=True)["input_ids"]
    updates = list(
        stream_generate(loaded.model, loaded.tokenizer, ids, GenerationSettings(seed=3, max_new_tokens=4))
    )
    assert updates[-1].finished
    assert 1 <= len(updates) <= 4
    assert updates[-1].finish_reason in ("length", "eos", "stop_word")


def test_local_directory_name_loads_the_same_model(demo_text_dir: Path, demo_model) -> None:
    loaded = load_text_model(ModelSpec(str(demo_text_dir), dtype="float32", cpu_memory="4GiB"))
    assert loaded.path == demo_text_dir
    assert loaded.is_demo  # the marker file, not the name, says so
    assert loaded.plan.budgets == {"cpu": 4 * 2**30}
    ids = torch.tensor([loaded.tokenizer("Hi there")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, demo_model(ids).logits)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_gpu_budget_without_gpu_loads_on_cpu(demo_cache: Path) -> None:
    loaded = load_text_model(ModelSpec(DEMO_TEXT_MODEL, dtype="float32", gpu_memory="0=8GiB"))
    assert loaded.plan.device_map == {"": "cpu"}
    assert any("none is visible" in note for note in loaded.notes)
    assert next(loaded.model.parameters()).device.type == "cpu"


@pytest.mark.parametrize(
    "changes",
    [{"quantization": "3bit"}, {"quantization": "4-bit"}, {"dtype": "int4"}, {"dtype": "fp16"}],
)
def test_invalid_spec(changes: dict) -> None:
    with pytest.raises(ValueError, match="quantization|dtype"):
        ModelSpec("org/model", **changes)


def test_valid_specs() -> None:
    for quantization in ("none", "8bit", "4bit"):
        for dtype in ("auto", "float32", "bfloat16", "float16"):
            assert ModelSpec("org/model", quantization=quantization, dtype=dtype).dtype == dtype


def test_choose_dtype_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda: False)
    assert choose_dtype("auto", on_gpu=False) == torch.float32
    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda: True)
    assert choose_dtype("auto", on_gpu=False) == torch.bfloat16
    assert choose_dtype("float16", on_gpu=False) == torch.float16
    assert choose_dtype("float32", on_gpu=True) == torch.float32


def test_quantization_configs() -> None:
    assert quantization_config("none", torch.float16, offloaded=False) is None
    four = quantization_config("4bit", torch.bfloat16, offloaded=False)
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4"
    assert four.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config("8bit", torch.float16, offloaded=True).llm_int8_enable_fp32_cpu_offload
    assert not quantization_config("8bit", torch.float16, offloaded=False).llm_int8_enable_fp32_cpu_offload
