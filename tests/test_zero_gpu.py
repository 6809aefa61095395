"""backend.zero_gpu: a no-op without the `spaces` package; spaces.GPU on the generating handlers with it."""

from __future__ import annotations

import functools
import sys
import types

import gradio as gr
import pytest

from backend.images import ImageLimits
from backend.models.holder import ModelHolder
from backend.models.loading import ModelSpec
from backend.services.chat import ChatService
from backend.services.vision import VisionService
from backend.settings import ServerLimits
from backend.zero_gpu import on_gpu


def handler(data, request: gr.Request = None):
    return data


def test_without_spaces_the_function_is_returned_unchanged(monkeypatch):
    monkeypatch.setitem(sys.modules, "spaces", None)  # import spaces now raises ImportError
    assert on_gpu(handler) is handler


@pytest.fixture
def fake_spaces(monkeypatch) -> list[str]:
    """A `spaces` module whose GPU decorator records what it wraps, wrapping as the real one does."""
    wrapped: list[str] = []
    module = types.ModuleType("spaces")

    def gpu(fn):
        @functools.wraps(fn)
        def on_the_gpu(*args, **kwargs):
            return fn(*args, **kwargs)

        wrapped.append(fn.__name__)
        return on_the_gpu

    module.GPU = gpu
    monkeypatch.setitem(sys.modules, "spaces", module)
    return wrapped


def test_with_spaces_the_function_is_wrapped_and_gradio_still_sees_the_request(fake_spaces):
    decorated = on_gpu(handler)
    assert decorated is not handler and fake_spaces == ["handler"]
    assert decorated("x") == "x"
    # Gradio injects gr.Request by the parameter's type hint; the wrapper must keep it.
    assert gr.utils.get_type_hints(decorated)["request"] is gr.Request


def test_the_ui_wraps_every_generating_handler(fake_spaces, demo_text_dir):
    from ui.layout import build_ui

    # Holders that are never loaded: building the UI does no GPU work.
    chat = ChatService(ModelHolder(ModelSpec(str(demo_text_dir))), ServerLimits())
    vision = VisionService(ModelHolder(ModelSpec("demo:tiny-llava")), chat, ServerLimits(), ImageLimits())
    build_ui(chat, vision, ServerLimits(), concurrency=2)
    ui_handlers = ["on_chat", "on_retry", "on_edit", "on_complete", "on_caption", "on_compare"]
    ui_handlers += ["on_show", "on_live", "on_step", "on_pick", "on_from_chat"]  # the Inspector's forwards
    assert sorted(fake_spaces) == sorted(ui_handlers + ["chat", "complete", "next_tokens", "caption"])
