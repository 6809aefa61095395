"""LoRA adapters: built here with PEFT, loaded on fp32 and 4-bit bases, chosen per request and per row."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import gradio as gr
import pytest
import torch

import backend.decode.beam_jobs as beam_jobs_module
from backend.config import parse_config
from backend.decode.engine import EngineLimits
from backend.decode.generation import generate_beam, stream_generate
from backend.errors import InvalidSettings
from backend.models.adapters import AdapterSpec, parse_adapter, parse_adapters, rows_using
from backend.models.holder import ModelHolder
from backend.models.loading import ModelSpec
from backend.services.chat import ChatService
from backend.settings import GenerationSettings, ServerLimits
from tests import streams as stream_helpers
from tests.streams import HANG, last_items_together, no_early_end, plugged
from ui.controls import build_controls

watch_forwards = stream_helpers.watch_forwards  # a fixture: tests ask for it by name

LIMITS = ServerLimits()
GREEDY = GenerationSettings(seed=0, mode="greedy", max_new_tokens=12, repetition_penalty=1.0)
PROMPTS = ["Hello there", "The weather today is", "Tell me a story"]


def build_adapter(base_dir: Path, target: Path, seed: int) -> Path:
    """A tiny LoRA whose B weights are non-zero (PEFT starts them at zero), so it changes the outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    model.save_pretrained(target)
    return target


def build_misfit_adapter(target: Path) -> Path:
    """A LoRA for a wider model than the demo: it must be left out, not break loading."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4
    )
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def adapters(demo_text_dir, tmp_path_factory) -> tuple[AdapterSpec, ...]:
    root = tmp_path_factory.mktemp("adapters")
    return (
        AdapterSpec("alpha", str(build_adapter(demo_text_dir, root / "alpha", seed=1))),
        AdapterSpec("beta", str(build_adapter(demo_text_dir, root / "beta", seed=2))),
        AdapterSpec("wide", str(build_misfit_adapter(root / "wide"))),
    )


@pytest.fixture(scope="module", params=["none", pytest.param("4bit", marks=pytest.mark.slow)])
def service(request, demo_text_dir, adapters) -> ChatService:
    spec = ModelSpec(str(demo_text_dir), quantization=request.param, dtype="float32", adapters=adapters)
    holder = ModelHolder(spec, fallback_to_demo=False)
    assert holder.load().state == "ready", holder.status().stage
    service = ChatService(holder, LIMITS, EngineLimits(max_batch_size=8))
    yield service
    service.release("test over")


def settings_with(**changes) -> GenerationSettings:
    return GenerationSettings(**{**GREEDY.to_dict(), "stop_words": (), **changes})


def complete(service: ChatService, text: str, **changes) -> str:
    return list(service.complete(text, settings_with(**changes)))[-1].text


def test_adapter_flags_and_their_checks(adapters, tmp_path):
    alpha, beta = adapters[0], adapters[1]
    assert parse_adapter(alpha.path) == alpha  # named after its directory
    assert parse_adapter(f"mine={alpha.path}") == AdapterSpec("mine", alpha.path)
    with pytest.raises(ValueError, match="named 'alpha'"):
        parse_adapters([alpha.path, f"alpha={beta.path}"])
    with pytest.raises(ValueError, match="not a PEFT adapter directory"):
        parse_adapter(str(tmp_path))
    with pytest.raises(ValueError, match="adapter name"):
        parse_adapter(f"bad name={alpha.path}")
    config = parse_config(["--lora", alpha.path, "--lora", f"b={beta.path}"], has_gpu=False, env={})
    assert [a.name for a in config.adapters] == ["alpha", "b"]
    from_env = parse_config([], has_gpu=False, env={"PLAYGROUND_LORA": f"{alpha.path},b={beta.path}"})
    assert from_env.adapters == config.adapters
    with pytest.raises(SystemExit):
        parse_config(["--lora", str(tmp_path)], has_gpu=False, env={})


def test_adapters_load_on_fp32_and_4bit_bases_and_change_the_reply(service):
    loaded = service.holder.get()
    assert loaded.adapters == ("alpha", "beta")  # "wide" does not fit the demo model: left out, with a note
    assert any("'wide' does not fit" in note for note in loaded.notes)
    if loaded.spec.quantization == "4bit":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.modules())
    assert service.adapters == ("", "alpha", "beta", "wide")  # what was given at launch
    base, alpha, beta = (complete(service, PROMPTS[1], adapter=name) for name in ("", "alpha", "beta"))
    assert len({base, alpha, beta}) == 3
    assert complete(service, PROMPTS[1]) == base  # no adapter named: the base model
    inspected = [service.next_tokens(PROMPTS[1], settings_with(adapter=name), 3) for name in ("", "alpha")]
    assert inspected[0].tokens != inspected[1].tokens  # the Inspector shows the adapter's distribution


def test_each_row_of_one_batch_uses_its_own_adapter(service, monkeypatch, watch_forwards):
    loaded = service.holder.get()
    engine = service.engine(loaded)
    forwards = watch_forwards(loaded.model, stats=engine.stats)
    names = ["alpha", "", "beta", "alpha", ""]
    jobs = [(PROMPTS[0], name) for name in names[:3]] + [(PROMPTS[1], "alpha"), (PROMPTS[2], "")]
    with plugged(engine, loaded.tokenizer("plug")["input_ids"]):  # all five are queued before any starts
        streams = [service.complete(text, settings_with(adapter=name)) for text, name in jobs]
    results = last_items_together(streams)
    # All five decode together: one step per token of the longest reply after the first.
    steps = forwards.steps()
    assert steps[0] == 5 and len(steps) == max(result.new_tokens for result in results) - 1
    monkeypatch.undo()
    assert len({result.text for result in results[:3]}) == 3  # one prompt, three adapters, three replies
    for (text, name), result in zip(jobs, results, strict=True):
        prompt = loaded.tokenizer(text)["input_ids"]
        with rows_using([name]):
            alone = list(stream_generate(loaded.model, loaded.tokenizer, prompt, GREEDY))[-1]
        assert result.text.strip() == alone.text.strip(), (text, name)


def test_a_beam_search_beside_the_batch_keeps_its_own_adapter(service, monkeypatch, watch_forwards):
    """Beams run in their own thread while the batch decodes on the base model: neither sees the other's.

    Ordered by events, not by which finishes first: the batch waits inside a decode step (its rows'
    adapters chosen) until the beam search is inside its own adapter's scope; then the batch's step runs
    while the beam search waits there, and the beam search runs once the batch has left its step.
    """
    loaded = service.holder.get()
    forwards = watch_forwards(loaded.model, hold_at=1)  # the batch's first decode step
    beam_entered, beam_go_on = threading.Event(), threading.Event()
    real_beam = beam_jobs_module.generate_beam

    def held_beam(*args, **kwargs):  # called inside the engine's rows_using([adapter]) on the beam's thread
        beam_entered.set()
        assert beam_go_on.wait(HANG), "the test never let the beam search go on"
        return real_beam(*args, **kwargs)

    monkeypatch.setattr(beam_jobs_module, "generate_beam", held_beam)
    batch = service.complete(PROMPTS[1], settings_with(max_new_tokens=30))
    forwards.wait_held()
    beam_settings = settings_with(mode="beam", num_beams=3, max_new_tokens=8)
    beam_stream = service.complete(PROMPTS[0], replace(beam_settings, adapter="alpha"))
    assert beam_entered.wait(HANG)
    assert service.in_flight() == 2  # the batch and the beam search, both mid-way
    forwards.go_on.set()  # the batch's step runs while the beam search is inside its adapter's scope
    while next(batch).new_tokens < 2:  # that step is done and the batch has left it
        pass
    beam_go_on.set()
    beam = list(beam_stream)[-1].text
    batch_text = list(batch)[-1].text
    monkeypatch.undo()
    assert beam != complete(service, PROMPTS[0], mode="beam", num_beams=3, max_new_tokens=8)
    prompt = loaded.tokenizer(PROMPTS[0])["input_ids"]
    with rows_using(["alpha"]):
        assert generate_beam(loaded.model, loaded.tokenizer, prompt, beam_settings).text == beam
    assert batch_text == complete(service, PROMPTS[1], max_new_tokens=30)


def test_an_adapter_outside_the_allowlist_is_refused_naming_the_field(service):
    for name in ("gamma", "wide", "__base__"):
        with pytest.raises(InvalidSettings, match="'adapter'.*choose one of '', 'alpha', 'beta'"):
            service.complete("Hi", GenerationSettings(adapter=name))
    with pytest.raises(InvalidSettings, match="'adapter'"):
        GenerationSettings(adapter="x" * 65).validated(LIMITS)
    with pytest.raises(InvalidSettings, match="'adapter'"):
        GenerationSettings.from_inputs({"adapter": 3}, LIMITS)


def test_the_adapter_control_lists_the_allowlist_and_hides_without_one():
    with gr.Blocks():
        plain = build_controls(LIMITS)["adapter"]
        chosen = build_controls(LIMITS, adapters=("", "alpha", "beta"))["adapter"]
    assert not plain.visible and chosen.visible
    assert [value for _, value in chosen.choices] == ["", "alpha", "beta"]


def test_a_request_gets_the_same_bits_beside_rows_with_adapters_as_alone(service, monkeypatch):
    """Seeds hold beside LoRA rows: the base rows' and an adapter row's numbers are those they get alone."""
    from tests.test_batch_invariance import Recorder

    no_early_end(monkeypatch)
    recorder = Recorder(monkeypatch)
    sampled = dict(
        mode="sample", temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=8
    )
    jobs = [(PROMPTS[i % 3], name, 1000 + i) for i, name in enumerate(["", "alpha", "beta", "", "alpha"])]
    for text, name, seed in jobs:
        list(service.complete(text, settings_with(adapter=name, seed=seed, **sampled)))
    reference = {seed - 1000: recorder.of(seed - 1000) for _, _, seed in jobs}
    recorder.first_logits.clear()
    loaded = service.holder.get()
    with plugged(service.engine(loaded), loaded.tokenizer("plug")["input_ids"]):  # all start together
        streams = [
            service.complete(text, settings_with(adapter=name, seed=seed, **sampled))
            for text, name, seed in jobs
        ]
    last_items_together(streams)
    for index, (logits, tokens) in reference.items():
        batched_logits, batched_tokens = recorder.of(index)
        assert batched_tokens == tokens and torch.equal(batched_logits, logits), jobs[index]
