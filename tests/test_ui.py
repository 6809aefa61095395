"""UI wiring: layering rules, controls matching the settings object, handlers keeping the conversation."""

from __future__ import annotations

import ast
import html
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest

from backend.models.holder import ModelHolder
from backend.models.loading import ModelSpec
from backend.prompting import Turn
from backend.request_stats import RequestStats
from backend.services.chat import ChatService
from backend.settings import GenerationSettings, ServerLimits
from ui.banner import banner_markdown
from ui.chat_text import LATEX_DELIMITERS, MARK, as_typed, shown
from ui.controls import build_controls
from ui.conversation_files import export_chat, import_chat
from ui.handlers import chat_turn, complete_text, regenerate, undo
from ui.messages import history_to_turns, note, text_of
from ui.system_tab import axis_limits, build_system_tab, plan_html
from ui.token_view import tokens_html

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
    # logprobs is asked for through /v1 only; the UI colours replies by probability instead.
    assert set(controls) == set(GenerationSettings.field_names()) - {"logprobs"}
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
    box, history, _ = updates[-1]
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
    box, history, _ = updates[-1]
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
    box, history, _ = run_chat(service, "Hello", [], seed=1, max_new_tokens=8)[-1]
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


def test_token_view_covers_the_visible_reply_and_escapes(service):
    reply = list(service.chat("Hello", [], GenerationSettings(seed=2, max_new_tokens=12)))[-1]
    assert len(reply.tokens) == reply.new_tokens
    for token in reply.tokens:
        assert 0.0 < token.probability <= 1.0
        assert token.alternatives[0][1] >= token.probability or token.alternatives[0][0] == token.text
    page = tokens_html(reply.tokens, reply.text)
    spans = re.findall(r'<span class="tok"[^>]*>(.*?)</span>', page, flags=re.DOTALL)  # a token may be "\n"
    assert html.unescape("".join(spans)).strip() == reply.text
    fake = [SimpleNamespace(text="<b>", probability=0.5, alternatives=(("<b>", 0.5),)), *reply.tokens]
    assert "<b>" not in tokens_html(fake, "<b>")


def test_token_view_stops_at_the_stop_word(service):
    full = list(service.chat("Hello", [], GenerationSettings(seed=0, mode="greedy", max_new_tokens=30)))[
        -1
    ].text
    stop = full[5:8]
    cut = list(
        service.chat(
            "Hello", [], GenerationSettings(seed=0, mode="greedy", max_new_tokens=30, stop_words=(stop,))
        )
    )
    page = tokens_html(cut[-1].tokens, cut[-1].text)
    spans = re.findall(r'<span class="tok"[^>]*>(.*?)</span>', page, flags=re.DOTALL)
    assert html.unescape("".join(spans)).strip() == full[: full.index(stop)].strip()


def test_retry_replaces_the_last_reply_and_undo_restores_the_text(service):
    _, history, _ = run_chat(service, "First", [], seed=1)[-1]
    _, history, _ = run_chat(service, "Second", history, seed=1)[-1]
    assert len(history_to_turns(history)) == 2
    _, retried, _ = list(regenerate(service, LIMITS, history, len(history) - 2, values(seed=99)))[-1]
    assert retried[:3] == history[:3]  # the first exchange and its stats stay
    assert retried[3]["content"] == "Second" and "seed 99" in retried[-1]["metadata"]["title"]
    _, edited, _ = list(regenerate(service, LIMITS, history, 3, values(seed=5), new_text="Changed"))[-1]
    assert [t.user for t in history_to_turns(edited)] == ["First", "Changed"]
    text, undone = undo(history, 3)
    assert text == "Second" and undone == history[:3]


def test_export_then_import_round_trips_the_chat_and_settings(service, tmp_path):
    _, history, _ = run_chat(service, "Hi <there> & you", [], seed=4)[-1]
    path = export_chat(history, values(seed=4, mode="greedy", stop_words="END\n\\n"), "demo", LIMITS)
    names = list(GenerationSettings.field_names())
    imported = import_chat(path, LIMITS, names)
    assert history_to_turns(imported[0]) == history_to_turns(history)
    restored = dict(zip(names, imported[1:], strict=True))
    assert restored["mode"] == "greedy" and restored["seed"] == 4 and restored["stop_words"] == "END\n\\n"
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    assert all(
        isinstance(output, dict) and output.get("__type__") == "update"
        for output in import_chat(str(bad), LIMITS, names)
    )


def test_stats_count_finished_and_cancelled_requests(demo_text_dir):
    holder = ModelHolder(ModelSpec(str(demo_text_dir), dtype="float32"), fallback_to_demo=False)
    holder.load()
    service = ChatService(holder, LIMITS)
    list(service.chat("Hello", [], GenerationSettings(seed=1, max_new_tokens=5)))
    stream = service.chat("Hello", [], GenerationSettings(seed=2, max_new_tokens=50))
    next(stream)
    stream.close()
    snapshot = service.stats.snapshot()
    assert (snapshot.finished_requests, snapshot.cancelled_requests, snapshot.active_requests) == (1, 1, 0)
    assert snapshot.tokens_per_second > 0


def test_shown_marks_maths_for_katex_and_leaves_prices_and_code_alone():
    assert shown(r"Area $x^2$, \(a+b\), $$\frac12$$ and \[y\]") == (
        rf"Area ${MARK}x^2{MARK}$, \({MARK}a+b{MARK}\), $${MARK}\frac12{MARK}$$ and \[{MARK}y{MARK}\]"
    )
    # The Chatbot renders marked delimiters only: Gradio itself would pair any two "$" or "\(".
    assert all(MARK in d["left"] and MARK in d["right"] for d in LATEX_DELIMITERS)
    as_is = [
        "It costs $5 and $10.",
        "$5+$10, $ x$, $x $ and $x$5",
        "`$a` and `$b \\(x\\)`",
        "```sh\necho $HOME $PATH | grep '\\(a\\)'\n```",
        "\\$5 and \\$10",
    ]
    for text in as_is:
        assert shown(text) == text
    typed = [*as_is, "x <b> & $a<b$ $$", "$$\n\\frac12\n$$ at $3", "a \u2060 b", "$5 and $x$"]
    for text in typed:
        assert as_typed(shown(text)) == text
    history = [
        {"role": "user", "content": shown("$x^2$ costs $5 & $6")},
        {"role": "assistant", "content": shown("$y$")},
    ]
    assert history_to_turns(history) == [Turn("$x^2$ costs $5 & $6", "$y$")]
    assert undo(history, 1) == ("$x^2$ costs $5 & $6", [])


# Characters only an emoji font draws (enough of Unicode's Emoji_Presentation for our marks).
EMOJI = re.compile("[\u231a\u231b\u23e9-\u23f3\u26d4\u2705\u274c\u274e\u2753-\u2757\U0001f000-\U0001faff]")


def fake_holder(state: str, is_demo: bool = False):
    status = SimpleNamespace(
        state=state, stage="Reading weights", fraction=0.4, fallback_reason="offline", note=None
    )
    return SimpleNamespace(status=lambda: status, is_demo=is_demo, loaded_name="org/model")


@pytest.mark.parametrize(
    ("text", "words", "emoji_allowed"),
    [
        (lambda: banner_markdown([("chat", fake_holder("ready"))]), "Chat model ready", False),
        (lambda: banner_markdown([("chat", fake_holder("failed"))]), "chat model could not be loaded", False),
        (lambda: banner_markdown([("chat", fake_holder("loading"))]), "Loading the chat model", True),
        (lambda: banner_markdown([("chat", fake_holder("ready", is_demo=True))]), "Demo mode", True),
        (lambda: plan_html({"fits": True, "devices": [], "warnings": []}), "Fits", False),
        (lambda: plan_html({"fits": False, "devices": [], "warnings": []}), "Does not fit", False),
    ],
)
def test_marks_say_their_meaning_in_words_not_in_emoji(text, words, emoji_allowed):
    """Without an emoji font (a bare Chromium) an emoji is an empty box."""
    shown_text = text()
    assert words in EMOJI.sub("", shown_text)
    assert emoji_allowed or not EMOJI.search(shown_text), shown_text


def test_idle_throughput_chart_has_a_readable_scale():
    """An all-zero chart left to Vega labels its axes "0.000000"."""
    assert axis_limits(SimpleNamespace(history=[])) == {"x_lim": [-119.0, 0.0], "y_lim": [0.0, 1.0]}
    assert axis_limits(SimpleNamespace(history=[(1.0, 0.0), (0.0, 0.0)]))["y_lim"] == [0.0, 1.0]
    assert axis_limits(SimpleNamespace(history=[(1.0, 37.5), (0.0, 2.0)]))["y_lim"] == [0.0, 37.5]
    holder = SimpleNamespace(
        choices=[], status=lambda: SimpleNamespace(state="loading", stage="Loading"), plan_report=lambda: None
    )
    service = SimpleNamespace(  # nothing generated
        holder=holder, stats=RequestStats(), kv_usage=lambda: None, decode_path=lambda: None
    )
    with gr.Blocks() as demo, gr.Tabs():
        build_system_tab(demo, service)
    plot = next(block for block in demo.blocks.values() if isinstance(block, gr.LinePlot))
    refresh = next(function.fn for function in demo.fns.values() if plot in function.outputs)
    for drawn in (plot, refresh()[-1]):  # as built, and as the page's timer redraws it
        assert drawn.x_lim == [-119.0, 0.0] and drawn.y_lim == [0.0, 1.0]


def test_the_page_adds_no_public_endpoint(service):
    """Versions, Compare and presets are UI events: private, so the API stays the four named endpoints."""
    from ui.layout import build_ui

    demo = build_ui(service, None, LIMITS, concurrency=2)
    info = demo.get_api_info()
    assert set(info["named_endpoints"]) == {"/chat", "/complete", "/caption", "/next_tokens"}
    assert info["unnamed_endpoints"] == {}
    chat = [p["parameter_name"] for p in info["named_endpoints"]["/chat"]["parameters"]]
    assert chat[:3] == ["message", "system_prompt", "seed"] and chat[-1] == "adapter"
    assert set(chat) == {"message", *GenerationSettings.field_names()} - {"logprobs"}


def test_where_images_are_off_the_page_says_why_and_offers_no_upload(service, demo_vision_dirs):
    from backend.contracts import IMAGES_OFF
    from ui.layout import build_ui

    def page(vision, images_off=None):
        demo = build_ui(service, vision, LIMITS, concurrency=2, images_off=images_off)
        box = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "message")
        notes = [b.value for b in demo.blocks.values() if getattr(b, "elem_id", None) == "images-off"]
        return box, notes

    box, notes = page(None, "Images are off: the backend server (tiny.gguf, llama.cpp) ...")
    assert box.sources == [] and notes == ["ℹ️ Images are off: the backend server (tiny.gguf, llama.cpp) ..."]
    assert page(None)[1] == [f"ℹ️ {IMAGES_OFF}"]  # --vision-model none
    from backend.images import ImageLimits
    from backend.models.holder import ModelHolder
    from backend.models.loading import ModelSpec
    from backend.services.vision import VisionService

    holder = ModelHolder(ModelSpec(str(demo_vision_dirs["demo:tiny-llava"])), False)
    box, notes = page(VisionService(holder, service, LIMITS, ImageLimits()))
    assert box.sources == ["upload"] and notes == []


def test_a_coloured_reply_asks_for_token_numbers_which_a_backend_server_gives_only_when_asked():
    from ui.handlers import chat_turn

    asked = []

    class Service:
        def chat(self, message, turns, settings):
            asked.append(settings.logprobs)
            return iter(())

    for colour, mode in ((True, "sample"), (False, "sample"), (True, "beam")):
        list(chat_turn(Service(), LIMITS, "Hi", [], {"mode": mode, "seed": 1, "max_new_tokens": 8}, colour))
    assert asked == [3, -1, -1]  # beam search reports none


def test_uploads_are_deleted_after_a_day_so_a_long_running_space_keeps_its_disk(service):
    from ui.layout import build_ui

    demo = build_ui(service, None, LIMITS, concurrency=2)
    every, older_than = demo.delete_cache
    assert every <= 3600 and older_than >= 86400  # hourly; a conversation keeps its images for a day


def test_an_api_stream_yields_while_waiting_so_that_a_cancel_can_close_it():
    """Gradio closes a cancelled generator only between yields: one that stays inside next() while its
    request waits in the engine's queue would keep its place there until admitted (a soak saw 'server
    busy' from such leftovers)."""
    from backend.replies import Reply
    from ui.handlers import api_stream

    ended = []

    def replies():
        try:
            for position in (3, 2, 1):
                yield Reply("", False, 0, 0.0, 1, "sample", queue_position=position)
            yield Reply("Hi", True, 1, 0.1, 1, "sample")
        finally:
            ended.append(True)

    stream = api_stream(replies)
    assert next(stream) == ""  # the first queue position already returns control to Gradio
    stream.close()
    assert ended == [True]  # and closing it ends the request's stream
