from __future__ import annotations

from pathlib import Path

import pytest

from backend.decode.engine import EngineLimits
from backend.decode.generation import stream_generate
from backend.errors import BadInput, ContextOverflow, InvalidSettings, ModelNotReady
from backend.models.holder import ModelHolder
from backend.models.loading import ModelSpec
from backend.prompting import Turn
from backend.services.chat import ChatService, prompt_budget
from backend.settings import MAX_SEED, GenerationSettings, ServerLimits, request_settings
from tests import streams as stream_helpers
from tests.streams import no_early_end, wait_until_idle

watch_forwards = stream_helpers.watch_forwards  # a fixture: tests ask for it by name

LIMITS = ServerLimits(max_new_tokens=1024, max_input_chars=20_000, max_num_beams=4)
QUICK = GenerationSettings(seed=5, max_new_tokens=6, system_prompt="Be brief.")


@pytest.fixture(scope="module")
def holder(demo_text_dir: Path) -> ModelHolder:
    holder = ModelHolder(ModelSpec(str(demo_text_dir), dtype="float32"), fallback_to_demo=False)
    assert holder.load().state == "ready"
    return holder


@pytest.fixture
def service(holder: ModelHolder) -> ChatService:
    return ChatService(holder, LIMITS)


def settings_like(base: GenerationSettings, **changes) -> GenerationSettings:
    return GenerationSettings(**{**base.to_dict(), "stop_words": base.stop_words, **changes})


def chat_text(system: str, history: list[Turn], message: str) -> str:
    """The demo chat template, written out by hand."""
    text = f"<s>{system}\n\n"
    for turn in history:
        text += f"USER: {turn.user}\nASSISTANT: {turn.assistant}</s>\n"
    return f"{text}USER: {message}\nASSISTANT:"


@pytest.mark.parametrize("message", ["", "   ", "\n\t ", None, 42])
def test_empty_message(service: ChatService, message) -> None:
    with pytest.raises(BadInput, match="empty"):
        service.chat(message, [], QUICK)
    with pytest.raises(BadInput, match="empty"):
        service.complete(message, QUICK)


def test_too_long_message_names_the_limit(service: ChatService) -> None:
    with pytest.raises(BadInput) as caught:
        service.chat("x" * 100_000, [], QUICK)
    assert "20,000" in str(caught.value) and "100,000" in str(caught.value)
    with pytest.raises(BadInput, match="20,000"):
        service.complete("y" * (LIMITS.max_input_chars + 1), QUICK)
    assert next(iter(service.complete("y" * 10, QUICK))).new_tokens == 1


@pytest.mark.parametrize(
    ("field", "value"), [("top_p", 0.0), ("temperature", -1.0), ("num_beams", 5), ("max_new_tokens", 1025)]
)
def test_invalid_settings_raise_at_the_edge_before_any_service_runs(field: str, value) -> None:
    bad = settings_like(QUICK, **{field: value})
    with pytest.raises(InvalidSettings) as caught:
        request_settings(bad.to_dict(), LIMITS)  # what the UI handlers, the Gradio API and /v1 call first
    assert caught.value.field == field


def test_reply_matches_the_engine(service: ChatService, holder: ModelHolder) -> None:
    history = [Turn("hi", "hello")]
    replies = list(service.chat("  How are you?  ", history, QUICK))
    loaded = holder.get()
    ids = loaded.tokenizer(chat_text("Be brief.", history, "How are you?"), add_special_tokens=False)[
        "input_ids"
    ]
    updates = list(stream_generate(loaded.model, loaded.tokenizer, ids, QUICK))
    assert [r.text for r in replies] == [u.text.lstrip() for u in updates]
    assert [r.done for r in replies] == [False] * (len(replies) - 1) + [True]
    assert replies[-1].finish_reason == updates[-1].finish_reason
    assert all(r.seed == 5 and r.mode == "sample" and r.notice is None for r in replies)


def test_random_seed_is_made_concrete_once_at_the_edge(service: ChatService) -> None:
    drawn = request_settings(settings_like(QUICK, seed=-1).to_dict(), LIMITS)
    assert drawn.seed >= 0  # drawn here, once: the service and the engine take it as it is
    with pytest.raises(ValueError, match="a concrete seed is needed"):
        list(service.chat("hello", [], settings_like(QUICK, seed=-1)))  # nothing below the edge draws one
    replies = list(service.chat("hello", [], drawn))
    seeds = {r.seed for r in replies}
    assert len(seeds) == 1
    seed = seeds.pop()
    assert 0 <= seed <= MAX_SEED
    again = list(service.chat("hello", [], settings_like(QUICK, seed=seed)))
    assert again[-1].text == replies[-1].text  # the shown seed reproduces the reply


def test_long_history_truncated_with_notice(service: ChatService, holder: ModelHolder) -> None:
    tokenizer = holder.get().tokenizer
    history = [Turn(f"Tell me fact number {i} about cows", f"Cows like fact {i}, truly.") for i in range(40)]
    settings = settings_like(QUICK, max_new_tokens=8)
    budget = holder.get().context_window - settings.max_new_tokens

    def length(dropped: int) -> int:
        text = chat_text("Be brief.", history[dropped:], "Last one?")
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    dropped = next(d for d in range(len(history) + 1) if length(d) <= budget)
    assert 1 < dropped < len(history)
    replies = list(service.chat("Last one?", history, settings))
    assert replies and replies[-1].done
    assert all(r.notice == replies[0].notice for r in replies)
    assert f"The {dropped} oldest turns were left out" in replies[0].notice


def test_one_dropped_turn_notice(service: ChatService, holder: ModelHolder) -> None:
    tokenizer = holder.get().tokenizer
    history = [Turn("word " * 600, "ok"), Turn("short", "fine")]
    budget = holder.get().context_window - QUICK.max_new_tokens
    full = len(tokenizer(chat_text("Be brief.", history, "Next?"), add_special_tokens=False)["input_ids"])
    kept = len(tokenizer(chat_text("Be brief.", history[1:], "Next?"), add_special_tokens=False)["input_ids"])
    assert kept <= budget < full
    replies = list(service.chat("Next?", history, QUICK))
    assert replies[0].notice == "The 1 oldest turn was left out to fit the model's context window."


def test_message_that_cannot_fit(service: ChatService) -> None:
    with pytest.raises(ContextOverflow, match="tokens"):
        service.chat("cow " * 600, [], QUICK)
    with pytest.raises(ContextOverflow, match="max_new_tokens"):
        service.chat("hi", [], settings_like(QUICK, max_new_tokens=1024))  # demo window is 512


def test_beam_yields_one_final_reply(service: ChatService) -> None:
    replies = list(service.chat("hello", [], settings_like(QUICK, mode="beam", num_beams=2)))
    assert len(replies) == 1
    assert replies[0].done and replies[0].mode == "beam"
    assert replies[0].finish_reason in ("length", "eos", "stop_word")
    assert replies[0].seed >= 0


def test_complete_returns_only_the_continuation(service: ChatService, holder: ModelHolder) -> None:
    text = "Once upon a time the cow"
    settings = settings_like(QUICK, mode="greedy", max_new_tokens=8)
    replies = list(service.complete(text, settings))
    loaded = holder.get()
    ids = loaded.tokenizer(text, add_special_tokens=True)["input_ids"]
    updates = list(stream_generate(loaded.model, loaded.tokenizer, ids, settings))
    assert replies[-1].text == updates[-1].text  # no lstrip: a completion keeps its leading space
    assert replies[-1].text and not replies[-1].text.startswith(text)


def test_model_not_ready() -> None:
    service = ChatService(ModelHolder(ModelSpec("org/never-loaded")), LIMITS)
    with pytest.raises(ModelNotReady):
        service.chat("hello", [], QUICK)
    with pytest.raises(ModelNotReady):
        service.complete("hello", QUICK)


def test_prompt_budget() -> None:
    assert prompt_budget(512, 12) == 500
    with pytest.raises(ContextOverflow, match="512"):
        prompt_budget(512, 512)


def test_a_stream_closed_before_its_first_reply_cancels_its_request(
    demo_text_dir, monkeypatch, watch_forwards
):
    """The engine must not keep decoding for a caller that left before reading anything."""
    holder = ModelHolder(ModelSpec(str(demo_text_dir), dtype="float32"), fallback_to_demo=False)
    assert holder.load().state == "ready"
    model = holder.get().model
    forwards = watch_forwards(model, hold_at=1)  # a decode step that began before the close waits for it
    no_early_end(monkeypatch)  # 400 tokens: only a cancel ends the reply sooner
    service = ChatService(holder, ServerLimits(), EngineLimits(idle_seconds=0.05))
    try:
        stream = service.chat("Hello", [], GenerationSettings(seed=1, max_new_tokens=400))
        engine = service.engine(holder.get())
        stream.close()
        forwards.go_on.set()
        wait_until_idle(engine)  # nothing decoding or waiting: no forward pass can follow
        assert len(forwards.steps()) <= 1  # at most the one under way when the stream closed, not 399
        assert engine.stats() == (0, 0)
    finally:
        forwards.go_on.set()
        service.release("test over")
