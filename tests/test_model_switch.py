"""Switching the chat or vision model at runtime within the allowlist set at launch."""

from __future__ import annotations

import gc
import shutil
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch

from backend.errors import BadInput, ModelNotReady
from backend.models.holder import ModelHolder
from backend.models.loading import ModelSpec
from backend.services.chat import ChatService
from backend.settings import GenerationSettings, ServerLimits
from ui.banner import banner_markdown

LIMITS = ServerLimits()
GREEDY = GenerationSettings(seed=0, mode="greedy", max_new_tokens=10, repetition_penalty=1.0)
PROMPT = "The weather today is"


@pytest.fixture(scope="module")
def other_text_dir(demo_text_dir: Path, tmp_path_factory) -> Path:
    """The demo model with other weights (same tokenizer), so replies show which one answers."""
    from transformers import AutoModelForCausalLM

    target = tmp_path_factory.mktemp("other-model") / "other"
    shutil.copytree(demo_text_dir, target)
    model = AutoModelForCausalLM.from_pretrained(demo_text_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model.save_pretrained(target)
    return target


def make_service(first: Path, *choices: str, drain_seconds: float = 30.0) -> ChatService:
    spec = ModelSpec(str(first), dtype="float32")
    holder = ModelHolder(spec, fallback_to_demo=False, choices=choices, drain_seconds=drain_seconds)
    assert holder.load().state == "ready"
    return ChatService(holder, LIMITS)


def complete(service: ChatService, settings: GenerationSettings = GREEDY) -> str:
    return list(service.complete(PROMPT, settings))[-1].text


def slow_down(model, monkeypatch, seconds: float = 0.02) -> None:
    original = model.forward

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", slow)


def test_names_outside_the_allowlist_are_refused(demo_text_dir, other_text_dir):
    service = make_service(demo_text_dir, str(other_text_dir))
    assert service.holder.choices == (str(demo_text_dir), str(other_text_dir))
    for name in ("/etc", "org/some-model", ""):
        with pytest.raises(BadInput, match="not one of the models offered here"):
            service.holder.switch(name)
    assert service.holder.status().state == "ready"
    service.holder.switch(str(demo_text_dir))  # already loaded: nothing to do
    assert service.holder.status().state == "ready"


def test_switch_unloads_reloads_and_replies_come_from_the_new_model(demo_text_dir, other_text_dir):
    service = make_service(demo_text_dir, str(other_text_dir))
    holder = service.holder
    before = complete(service)
    old_model = weakref.ref(holder.get().model)
    holder.switch(str(other_text_dir))
    assert holder.status().state == "loading" and "Switching to" in holder.status().stage
    with pytest.raises(ModelNotReady, match="Switching to .*other"):
        complete(service)
    with pytest.raises(ModelNotReady, match="Cannot switch now"):
        holder.switch(str(demo_text_dir))
    assert holder.wait(60).state == "ready"
    assert holder.get().path == other_text_dir and holder.spec.name == str(other_text_dir)
    gc.collect()
    assert old_model() is None  # unloaded: nothing holds the old weights
    after = complete(service)
    assert after != before
    holder.switch(str(demo_text_dir))
    assert holder.wait(60).state == "ready"
    assert complete(service) == before


def test_a_request_in_flight_finishes_before_the_switch(demo_text_dir, other_text_dir, monkeypatch):
    service = make_service(demo_text_dir, str(other_text_dir))
    expected = complete(service, GenerationSettings(seed=3, max_new_tokens=30))
    slow_down(service.holder.get().model, monkeypatch)
    running = service.complete(PROMPT, GenerationSettings(seed=3, max_new_tokens=30))
    next(running)
    service.holder.switch(str(other_text_dir))
    with pytest.raises(ModelNotReady, match="Switching to"):
        service.complete(PROMPT, GREEDY)  # refused while the running one finishes
    deadline = time.monotonic() + 5
    while "waiting for 1 request" not in service.holder.status().stage and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "waiting for 1 request" in service.holder.status().stage
    assert list(running)[-1].text == expected  # finished on the old model, undisturbed
    assert service.holder.wait(60).state == "ready"
    assert service.holder.get().path == other_text_dir


def test_a_request_outlasting_the_wait_gets_a_clear_message(demo_text_dir, other_text_dir, monkeypatch):
    service = make_service(demo_text_dir, str(other_text_dir), drain_seconds=0.3)
    slow_down(service.holder.get().model, monkeypatch)
    running = service.complete(PROMPT, GenerationSettings(seed=3, max_new_tokens=500))
    next(running)
    service.holder.switch(str(other_text_dir))
    with pytest.raises(ModelNotReady, match="switched to .*other.*please resend"):
        list(running)
    assert service.holder.wait(60).state == "ready"
    assert complete(service)


def test_a_model_that_fails_to_load_leaves_the_previous_one_serving(demo_text_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    service = make_service(demo_text_dir, str(broken))
    before = complete(service)
    service.holder.switch(str(broken))
    status = service.holder.wait(60)
    assert status.state == "ready" and f"Switching to {broken} failed" in status.note
    assert f"Switching to {broken} failed" in banner_markdown([("chat", service.holder)])
    assert service.holder.get().path == demo_text_dir
    assert complete(service) == before


def test_the_vision_model_switches_too(demo_vision_dirs):
    from backend.images import ImageLimits
    from backend.models.demo_vision import DEMO_LLAVA
    from backend.models.vision_loading import load_vision_model
    from backend.services.vision import VisionService

    llava, blip = (str(demo_vision_dirs[name]) for name in ("demo:tiny-llava", "demo:tiny-blip2"))
    holder = ModelHolder(
        ModelSpec(llava, dtype="float32"), False, load_vision_model, DEMO_LLAVA, choices=[blip]
    )
    assert holder.load().state == "ready"
    vision = VisionService(holder, None, LIMITS, ImageLimits())
    assert vision.family() == "llava"
    holder.switch(blip)
    with pytest.raises(ModelNotReady, match="Switching to"):
        vision.family()
    assert holder.wait(60).state == "ready"
    assert vision.family() == "blip-2"


@pytest.mark.slow
def test_adapters_and_switching_end_to_end(demo_text_dir, other_text_dir, tmp_path):
    import gradio as gr
    from gradio_client import Client

    from app import create_app
    from backend.config import parse_config
    from tests.test_adapters import build_adapter

    adapter = build_adapter(demo_text_dir, tmp_path / "alpha", seed=1)
    arguments = ["--model", str(demo_text_dir), "--dtype", "float32", "--vision-model", "none"]
    arguments += ["--lora", str(adapter), "--model-choices", str(other_text_dir)]
    demo, (holder,) = create_app(parse_config(arguments, has_gpu=False, env={}), load_in_background=False)
    gate, load = threading.Event(), holder.loader
    holder.loader = lambda spec, progress: gate.wait(30) and load(spec, progress)
    demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)

        def ask(**kwargs) -> str:
            return client.predict(message="Hi", mode="greedy", max_new_tokens=8, api_name="/chat", **kwargs)

        base, alpha = ask(), ask(adapter="alpha")
        assert base != alpha
        with pytest.raises(Exception, match="'adapter'"):
            ask(adapter="beta")
        elem_ids = {component["props"].get("elem_id") for component in demo.config["components"]}
        assert {"adapter", "switch-chat-model", "switch-chat"} <= elem_ids
        switch = next(f.fn for f in demo.fns.values() if f.name == "switch")  # the System tab's button
        with pytest.raises(gr.Error, match="not one of the models offered"):
            switch("/etc")
        switch(str(other_text_dir))
        with pytest.raises(Exception, match="Switching to"):
            ask()
        gate.set()
        assert holder.wait(60).state == "ready"
        assert ask() != base and ask(adapter="alpha") != alpha  # the new model, with the adapter on it too
    finally:
        gate.set()
        demo.close()
