"""UI wiring: layering rules, controls matching the settings object, handlers keeping the conversation."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import gradio as gr
import pytest

from backend.chat_service import ChatService
from backend.loading import ModelSpec
from backend.model_holder import ModelHolder
from backend.settings import GenerationSettings, ServerLimits
from ui.controls import build_controls
from ui.handlers import chat_turn, complete_text
from ui.messages import history_to_turns, note, text_of

ROOT = Path(__file__).resolve().parent.parent
LIMITS = ServerLimits(max_new_tokens=64)


def imported_modules(folder: str) -> set[str]:
    names = set()
    for path in (ROOT / folder).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_backend_never_imports_gradio():
    assert "gradio" not in imported_modules("backend")


def test_ui_never_imports_model_code():
    assert not {"torch", "transformers", "accelerate", "bitsandbytes"} & imported_modules("ui")
    probe = "import sys, ui.layout, ui.handlers; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_controls_match_settings_fields():
    with gr.Blocks():
        controls = build_controls(LIMITS)
    assert set(controls) == set(GenerationSettings.field_names())
    defaults = GenerationSettings()
    values = {name: component.value for name, component in controls.items()}
    assert GenerationSettings.from_inputs(values, LIMITS) == GenerationSettings.from_inputs(
        {**defaults.to_dict(), "max_new_tokens": min(defaults.max_new_tokens, LIMITS.max_new_tokens)}, LIMITS
    )


def test_text_of_and_history_to_turns():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "a &lt;b&gt;"}]},
        {"role": "assistant", "content": "reply &amp; more"},
        note("12 tokens · 3.0 tok/s"),
        {"role": "user", "content": "unanswered"},
        note("⚠️ failed"),
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": [{"type": "text", "text": "two"}]},
    ]
    turns = history_to_turns(history)
    assert [(t.user, t.assistant) for t in turns] == [("a <b>", "reply & more"), ("second", "two")]
    assert text_of([{"type": "file", "file": {}}, {"type": "text", "text": "x"}]) == "x"


@pytest.fixture(scope="module")
def service(demo_text_dir):
    holder = ModelHolder(ModelSpec(str(demo_text_dir), dtype="float32"), fallback_to_demo=False)
    assert holder.load().state == "ready"
    return ChatService(holder, LIMITS)


def values(**overrides):
    return {**GenerationSettings(max_new_tokens=8).to_dict(), "stop_words": "", **overrides}


def run_chat(service, message, history, **overrides):
    return list(chat_turn(service, LIMITS, message, history, values(**overrides)))


def test_chat_turn_streams_then_adds_stats(service):
    updates = run_chat(service, "Hi <script>x</script>", [], seed=5)
    box, history = updates[-1]
    assert box == ""
    assert history[0] == {"role": "user", "content": "Hi &lt;script&gt;x&lt;/script&gt;"}
    assert history[1]["role"] == "assistant" and "metadata" not in history[1]
    assert "seed 5" in history[2]["metadata"]["title"] and "8 tokens" in history[2]["metadata"]["title"]
    assert len(updates) > 2  # streamed: the user message first, then growing replies


@pytest.mark.parametrize(
    ("message", "overrides", "expected"),
    [
        ("", {}, "Message is empty"),
        ("hi", {"top_p": 2.0}, "'top_p'"),
        ("x" * 30_000, {}, "30,000 characters"),
    ],
)
def test_chat_turn_errors_keep_history_and_typed_message(service, message, overrides, expected):
    before = [{"role": "user", "content": "old"}, {"role": "assistant", "content": "answer"}]
    updates = run_chat(service, message, list(before), **overrides)
    box, history = updates[-1]
    assert box == message  # the typed text stays to be fixed
    assert history[:2] == before
    assert expected in history[2]["metadata"]["title"]


def test_chat_turn_failure_mid_stream_keeps_partial_reply(service, monkeypatch):
    model = service.holder.get().model
    original, calls = model.forward, {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("boom")
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", failing)
    box, history = run_chat(service, "Hello", [], seed=1, max_new_tokens=8)[-1]
    assert history[0]["content"] == "Hello"
    assert "Generation failed (RuntimeError: boom)" in history[-1]["metadata"]["title"]
    assert history_to_turns(history)  # the partial reply is part of the conversation


def test_beam_shows_a_pending_note_first(service):
    updates = run_chat(service, "Hello", [], mode="beam", num_beams=2)
    assert "cannot stream" in updates[0][1][-1]["metadata"]["title"]
    assert "beam" in updates[-1][1][-1]["metadata"]["title"]


def test_complete_text_writes_into_the_same_box(service):
    updates = list(complete_text(service, LIMITS, "Once upon a time", values(mode="greedy")))
    text, stats = updates[-1]
    assert text.startswith("Once upon a time") and len(text) > len("Once upon a time")
    assert "greedy" in stats
    bad_text, bad_stats = list(complete_text(service, LIMITS, "Once", values(top_k=-3)))[-1]
    assert bad_text == "Once" and "'top_k'" in bad_stats
