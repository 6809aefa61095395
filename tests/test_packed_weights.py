"""Linear layers on oneDNN with packed weights: the same maths, each weight stored once, clear refusals."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from backend.config import parse_config
from backend.models.holder import ModelHolder
from backend.models.loading import ModelSpec, load_text_model
from backend.models.packed_weights import PackedLinear, pack_linears, unavailable_reason
from ui.system_tab import model_markdown


def tiny_llama(dtype: torch.dtype, tied: bool = True) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).to(dtype).eval()


@pytest.mark.parametrize(
    "dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["float32", "bfloat16"]
)
def test_a_packed_model_computes_the_same_logits_for_every_row_count(dtype, tolerance):
    model = tiny_llama(dtype)
    ids = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = [model(ids[:rows]).logits.float() for rows in (1, 3)]
        report = pack_linears(model)
        got = [model(ids[:rows]).logits.float() for rows in (1, 3)]
    assert report.layers == 2 * 7 + 1  # q k v o gate up down per layer, and the output layer
    assert all(type(m) is not nn.Linear for m in model.modules())
    for want, have in zip(expected, got, strict=True):
        assert torch.allclose(have, want, rtol=tolerance, atol=tolerance * want.abs().max().item())


def test_each_weight_is_stored_once_except_where_something_else_reads_it():
    model = tiny_llama(torch.float32)  # the output layer shares the input embedding's weight
    report = pack_linears(model)
    layers = model.model.layers
    assert layers[0].mlp.up_proj.weight.is_meta and layers[1].self_attn.q_proj.weight.is_meta
    assert layers[0].mlp.up_proj.weight.shape == (128, 64)  # shape and dtype stay readable
    assert not model.lm_head.weight.is_meta and model.lm_head.weight is model.model.embed_tokens.weight
    assert report.kept_bytes == 256 * 64 * 4
    assert report.freed_bytes == 2 * (3 * 64 * 128 + 2 * 64 * 64 + 2 * 64 * 32) * 4
    untied = tiny_llama(torch.float32, tied=False)
    assert pack_linears(untied).kept_bytes == 0 and untied.lm_head.weight.is_meta


def test_a_shared_weight_is_copied_only_while_memory_allows():
    output_layer = 256 * 64 * 4  # bytes of the tied output layer's weight
    short = tiny_llama(torch.float32)
    report = pack_linears(short, spare_bytes=output_layer - 1)
    assert type(short.lm_head) is nn.Linear and report.kept_bytes == 0 and report.skipped == 1
    assert "1 shared layers left unpacked" in report.text and report.layers == 2 * 7
    roomy = tiny_llama(torch.float32)
    assert pack_linears(roomy, spare_bytes=output_layer).kept_bytes == output_layer


def test_a_layer_wrapped_by_lora_keeps_its_weight_and_the_adapter_still_applies():
    base = tiny_llama(torch.float32)
    model = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
        with model.disable_adapter():
            without = model(input_ids=ids).logits
        pack_linears(model)
        got = model(input_ids=ids).logits
    q_proj = base.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q_proj, PackedLinear) and not q_proj.weight.is_meta
    assert base.model.layers[0].self_attn.k_proj.weight.is_meta
    assert not torch.allclose(expected, without, atol=1e-3)  # the adapter changes the numbers...
    assert torch.allclose(got, expected, atol=1e-4)  # ...and still does once its base runs packed


def test_quantized_and_other_subclassed_linears_are_left_alone():
    class QuantizedLinear(nn.Linear):  # as bitsandbytes' Linear8bitLt and Linear4bit are
        pass

    model = nn.Sequential(nn.Linear(16, 16), QuantizedLinear(16, 16))
    report = pack_linears(model)
    assert report.layers == 1 and type(model[1]) is QuantizedLinear and not model[1].weight.is_meta


def test_what_cannot_be_packed_says_why():
    on_meta = nn.Linear(4, 4, device="meta")
    assert unavailable_reason(on_meta) == "the model is not wholly on the CPU"
    report = pack_linears(on_meta)
    assert report.layers == 0 and "not wholly on the CPU" in report.text
    hooked = nn.Linear(4, 4)
    hooked._hf_hook = object()  # what accelerate leaves on modules it offloads
    assert "offloads" in pack_linears(hooked).text and type(hooked) is nn.Linear
    assert "no plain linear layers" in pack_linears(nn.Sequential(nn.ReLU())).text


def test_nothing_is_packed_where_a_gpu_is_present(monkeypatch):
    """On ZeroGPU a model is loaded on the CPU and moved to a GPU inside each call: it must stay movable."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = nn.Sequential(nn.Linear(4, 4))
    assert pack_linears(model).text == "oneDNN packed weights: off (a GPU is present)"
    assert type(model[0]) is nn.Linear and not model[0].weight.is_meta


def test_the_app_packs_by_default_and_the_flag_turns_it_off(demo_text_dir):
    assert parse_config([], has_gpu=False, env={}).placement.packed_weights
    off = parse_config(["--no-packed-weights"], has_gpu=False, env={}).placement
    assert not off.packed_weights
    spec = ModelSpec(name=str(demo_text_dir), dtype="float32")
    packed = load_text_model(spec)
    plain = load_text_model(replace(spec, packed_weights=False))
    assert packed.kernels.startswith("oneDNN packed weights: on")
    assert "--no-packed-weights" in plain.kernels
    assert any(isinstance(m, PackedLinear) for m in packed.model.modules())
    assert not any(isinstance(m, PackedLinear) for m in plain.model.modules())
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.inference_mode():
        assert torch.allclose(packed.model(ids).logits, plain.model(ids).logits, atol=1e-4)
    holder = ModelHolder(spec)
    holder.load()
    assert "**Kernels:** oneDNN packed weights: on" in model_markdown(holder)  # the System tab says so
