from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from backend.errors import ContextOverflow
from backend.models.loading import context_window
from backend.prompting import VICUNA_SYSTEM, Turn, build_chat_prompt, build_raw_prompt

HISTORY = [Turn("hi", "hello"), Turn("how are you?", "fine, thanks")]
NO_SYSTEM_ROLE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% elif message['role'] == 'user' %}[U]{{ message['content'] }}[/U]"
    "{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


@pytest.fixture
def tokenizer_copy(demo_text_dir):
    """A fresh tokenizer whose chat_template a test may change."""
    return AutoTokenizer.from_pretrained(demo_text_dir)


def encode(tokenizer, text: str, bos: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [tokenizer.bos_token_id, *ids] if bos else ids


def demo_chat_text(system: str, history: list[Turn], message: str) -> str:
    """The demo model's chat template, written out by hand."""
    text = f"{system}\n\n" if system else ""
    for turn in history:
        text += f"USER: {turn.user}\nASSISTANT: {turn.assistant}</s>\n"
    return f"{text}USER: {message}\nASSISTANT:"


def test_chat_template_used_when_present(demo_tokenizer) -> None:
    prompt = build_chat_prompt(demo_tokenizer, "Be brief.", HISTORY, "And you?", budget=400)
    assert prompt.template == "chat_template"
    assert prompt.dropped_turns == 0
    assert prompt.ids == encode(demo_tokenizer, demo_chat_text("Be brief.", HISTORY, "And you?"), bos=True)
    assert prompt.ids.count(demo_tokenizer.bos_token_id) == 1


def test_blank_system_prompt_is_left_out(demo_tokenizer) -> None:
    prompt = build_chat_prompt(demo_tokenizer, "  ", [], "Hi", budget=400)
    assert prompt.ids == encode(demo_tokenizer, "USER: Hi\nASSISTANT:", bos=True)


def test_template_without_bos_still_gets_exactly_one(tokenizer_copy) -> None:
    tokenizer_copy.chat_template = tokenizer_copy.chat_template.replace("{{ bos_token }}", "")
    prompt = build_chat_prompt(tokenizer_copy, "Sys", [], "Hi", budget=400)
    assert prompt.ids == encode(tokenizer_copy, demo_chat_text("Sys", [], "Hi"), bos=True)
    assert prompt.ids.count(tokenizer_copy.bos_token_id) == 1


def test_vicuna_when_there_is_no_chat_template(tokenizer_copy) -> None:
    tokenizer_copy.chat_template = None
    prompt = build_chat_prompt(tokenizer_copy, "You are terse.", HISTORY, "And you?", budget=400)
    assert prompt.template == "vicuna_v1.1"
    # FastChat's vicuna_v1.1: system, " ", then "USER: x ASSISTANT: y</s>" per turn, "USER: m ASSISTANT:".
    expected = (
        "You are terse. USER: hi ASSISTANT: hello</s>USER: how are you? ASSISTANT: fine, thanks</s>"
        "USER: And you? ASSISTANT:"
    )
    assert prompt.ids == encode(tokenizer_copy, expected, bos=True)
    assert prompt.ids.count(tokenizer_copy.bos_token_id) == 1


def test_vicuna_default_system_prompt(tokenizer_copy) -> None:
    tokenizer_copy.chat_template = None
    prompt = build_chat_prompt(tokenizer_copy, "", [], "Hi", budget=400)
    assert tokenizer_copy.decode(prompt.ids) == f"<s>{VICUNA_SYSTEM} USER: Hi ASSISTANT:"


def test_system_prompt_folded_when_template_refuses_system_role(tokenizer_copy) -> None:
    tokenizer_copy.chat_template = NO_SYSTEM_ROLE
    prompt = build_chat_prompt(tokenizer_copy, " Be kind. ", HISTORY[:1], "Bye", budget=400)
    expected = "[U]Be kind.\n\nhi[/U]hello</s>[U]Bye[/U]"
    assert prompt.template == "chat_template"
    assert prompt.ids == encode(tokenizer_copy, expected, bos=True)
    alone = build_chat_prompt(tokenizer_copy, "Be kind.", [], "Bye", budget=400)
    assert alone.ids == encode(tokenizer_copy, "[U]Be kind.\n\nBye[/U]", bos=True)
    without = build_chat_prompt(tokenizer_copy, "", [], "Bye", budget=400)
    assert without.ids == encode(tokenizer_copy, "[U]Bye[/U]", bos=True)


@pytest.mark.parametrize("keep", [0, 1, 3, 5])
def test_truncation_drops_oldest_turns_first(demo_tokenizer, keep: int) -> None:
    history = [Turn(f"question number {i}", f"answer number {i}") for i in range(6)]
    lengths = [
        len(encode(demo_tokenizer, demo_chat_text("Sys", history[d:], "Now?"), bos=True)) for d in range(7)
    ]
    assert lengths == sorted(lengths, reverse=True)
    dropped = len(history) - keep
    budget = lengths[dropped]  # fits exactly with `keep` turns, one token short with one more
    prompt = build_chat_prompt(demo_tokenizer, "Sys", history, "Now?", budget=budget)
    assert prompt.dropped_turns == dropped
    assert prompt.ids == encode(demo_tokenizer, demo_chat_text("Sys", history[dropped:], "Now?"), bos=True)
    assert len(prompt.ids) <= budget


def test_message_alone_too_long(demo_tokenizer) -> None:
    message = "word " * 200
    needed = len(encode(demo_tokenizer, demo_chat_text("", [], message.strip()), bos=True))
    with pytest.raises(ContextOverflow, match="tokens") as caught:
        build_chat_prompt(demo_tokenizer, "", HISTORY, message.strip(), budget=needed - 1)
    assert str(needed) in str(caught.value) and str(needed - 1) in str(caught.value)
    assert build_chat_prompt(demo_tokenizer, "", HISTORY, message.strip(), budget=needed).dropped_turns == 2


def test_raw_prompt_adds_one_bos(demo_tokenizer) -> None:
    text = "Once upon a time"
    prompt = build_raw_prompt(demo_tokenizer, text, budget=100)
    assert prompt.ids == encode(demo_tokenizer, text, bos=True)
    assert prompt.ids.count(demo_tokenizer.bos_token_id) == 1
    assert (prompt.template, prompt.dropped_turns) == ("raw", 0)


def test_raw_prompt_too_long(demo_tokenizer) -> None:
    text = "many words here " * 20
    length = len(encode(demo_tokenizer, text, bos=True))
    assert build_raw_prompt(demo_tokenizer, text, budget=length).ids
    with pytest.raises(ContextOverflow, match="tokens"):
        build_raw_prompt(demo_tokenizer, text, budget=length - 1)


def test_context_window(demo_model, demo_tokenizer) -> None:
    assert context_window(demo_model.config, demo_tokenizer) == demo_model.config.max_position_embeddings
    assert context_window(SimpleNamespace(max_position_embeddings=4096), None) == 4096
    assert context_window(SimpleNamespace(n_positions=1024), None) == 1024
    assert context_window(SimpleNamespace(), SimpleNamespace(model_max_length=777)) == 777
    # transformers' "no limit" placeholder is not a context window.
    assert context_window(SimpleNamespace(), SimpleNamespace(model_max_length=int(1e30))) == 2048
    assert context_window(SimpleNamespace(max_position_embeddings=None), None) == 2048
