from __future__ import annotations

import math
from dataclasses import replace

import pytest

from backend.errors import InvalidSettings
from backend.settings import (
    MAX_SEED,
    MAX_STOP_WORD_CHARS,
    MAX_STOP_WORDS,
    MAX_SYSTEM_PROMPT_CHARS,
    GenerationSettings,
    ServerLimits,
    parse_stop_words,
)

LIMITS = ServerLimits(max_new_tokens=100, max_input_chars=1000, max_num_beams=4)
BASE = GenerationSettings(max_new_tokens=32)  # valid under LIMITS, so only the changed field can fail


def rejected_field(settings: GenerationSettings, limits: ServerLimits = LIMITS) -> str:
    with pytest.raises(InvalidSettings) as caught:
        settings.validated(limits)
    assert caught.value.field in str(caught.value)
    return caught.value.field


def test_defaults_are_valid() -> None:
    settings = GenerationSettings()
    assert settings.validated(ServerLimits()) is settings
    assert BASE.validated(LIMITS) is BASE


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.0000001),
        ("top_p", 2.0),
        ("top_p", math.nan),
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("num_beams", 0),
        ("num_beams", LIMITS.max_num_beams + 1),
        ("mode", "nucleus"),
        ("mode", ""),
        ("max_new_tokens", 0),
        ("max_new_tokens", -5),
        ("max_new_tokens", LIMITS.max_new_tokens + 1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", math.nan),
        ("seed", -2),
        ("seed", MAX_SEED + 1),
        ("seed", 1.5),
        ("top_k", 2.0),
        ("system_prompt", "x" * (MAX_SYSTEM_PROMPT_CHARS + 1)),
        ("system_prompt", None),
    ],
)
def test_invalid_value_names_its_field(field: str, value: object) -> None:
    assert rejected_field(replace(BASE, **{field: value})) == field


@pytest.mark.parametrize("field", ["seed", "top_k", "max_new_tokens", "num_beams", "temperature", "top_p"])
@pytest.mark.parametrize("value", [True, False])
def test_bools_are_not_numbers(field: str, value: bool) -> None:
    assert rejected_field(replace(BASE, **{field: value})) == field


@pytest.mark.parametrize(
    "stop_words",
    [
        tuple(f"w{i}" for i in range(MAX_STOP_WORDS + 1)),
        ("ok", ""),
        ("x" * (MAX_STOP_WORD_CHARS + 1),),
        ("ok", 3),
    ],
)
def test_bad_stop_words_rejected(stop_words: tuple) -> None:
    assert rejected_field(replace(BASE, stop_words=stop_words)) == "stop_words"


def test_boundary_values_accepted() -> None:
    edge = GenerationSettings(
        top_k=0,
        top_p=1.0,
        temperature=0.0,
        num_beams=LIMITS.max_num_beams,
        max_new_tokens=LIMITS.max_new_tokens,
        seed=MAX_SEED,
        stop_words=tuple(f"w{i}" for i in range(MAX_STOP_WORDS - 1)) + ("x" * MAX_STOP_WORD_CHARS,),
        system_prompt="",
    )
    assert edge.validated(LIMITS) == edge
    assert GenerationSettings(max_new_tokens=1, num_beams=1, seed=0).validated(LIMITS).max_new_tokens == 1


def test_limit_comes_from_server_limits() -> None:
    settings = GenerationSettings(max_new_tokens=500)
    assert rejected_field(settings, ServerLimits(max_new_tokens=499)) == "max_new_tokens"
    assert settings.validated(ServerLimits(max_new_tokens=500)) == settings


def test_from_inputs_coerces_ui_values() -> None:
    settings = GenerationSettings.from_inputs(
        {
            "seed": "42",
            "top_k": 3.0,
            "num_beams": "2",
            "max_new_tokens": 64.0,
            "temperature": "0.5",
            "top_p": 1,
            "mode": "greedy",
            "stop_words": "USER:\nfoo\\n",
        },
        LIMITS,
    )
    assert (settings.seed, settings.top_k, settings.num_beams, settings.max_new_tokens) == (42, 3, 2, 64)
    for name in ("seed", "top_k", "num_beams", "max_new_tokens"):
        assert type(getattr(settings, name)) is int, name
    assert settings.temperature == 0.5
    assert settings.top_p == 1
    assert settings.mode == "greedy"
    assert settings.stop_words == ("USER:", "foo\n")


def test_from_inputs_missing_and_blank_use_defaults() -> None:
    defaults = GenerationSettings()
    blanks = {"top_k": None, "temperature": "  ", "seed": ""}
    settings = GenerationSettings.from_inputs(blanks, ServerLimits())
    assert settings == defaults
    # An empty system prompt is a choice, not a missing value.
    assert GenerationSettings.from_inputs({"system_prompt": ""}, ServerLimits()).system_prompt == ""


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_beams", 3.5),
        ("top_k", "2.5"),
        ("top_k", "many"),
        ("temperature", "hot"),
        ("seed", math.nan),
        ("max_new_tokens", math.inf),
        ("top_k", True),
        ("mode", 3),
        ("mode", "unknown"),
        ("max_new_tokens", "101"),
        ("temperature", "nan"),
    ],
)
def test_from_inputs_rejects(field: str, value: object) -> None:
    with pytest.raises(InvalidSettings) as caught:
        GenerationSettings.from_inputs({field: value}, LIMITS)
    assert caught.value.field == field


def test_from_inputs_rejects_unknown_field_names() -> None:
    with pytest.raises(InvalidSettings) as caught:
        GenerationSettings.from_inputs({"temperature": 0.5, "top_a": 0.1}, LIMITS)
    assert caught.value.field == "top_a"


def test_random_seed_is_drawn_and_kept() -> None:
    settings = GenerationSettings(seed=-1, temperature=0.3)
    drawn = [settings.with_seed() for _ in range(5)]
    for concrete in drawn:
        assert 0 <= concrete.seed <= MAX_SEED
        assert replace(concrete, seed=-1) == settings
        assert concrete.to_dict()["seed"] == concrete.seed
        assert concrete.with_seed() is concrete  # a concrete seed is never redrawn
        concrete.validated(ServerLimits())
    assert len({s.seed for s in drawn}) > 1


def test_concrete_seed_unchanged() -> None:
    settings = GenerationSettings(seed=0)
    assert settings.with_seed().seed == 0


def test_to_dict_roundtrips_through_from_inputs() -> None:
    settings = GenerationSettings(seed=7, mode="beam", stop_words=("a", "\n"), top_k=0, num_beams=3)
    data = settings.to_dict()
    assert data["stop_words"] == ["a", "\n"]
    assert set(data) == set(GenerationSettings.field_names())
    assert GenerationSettings.from_inputs(data, ServerLimits()) == settings


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, ()),
        ("", ()),
        ("USER:", ("USER:",)),
        ("USER:\nASSISTANT:", ("USER:", "ASSISTANT:")),
        ("USER:\n\n\nEND\n", ("USER:", "END")),
        ("\\n", ("\n",)),
        ("a\\nb\n\\t", ("a\nb", "\t")),
        ("x\nx\ny\nx", ("x", "y")),
        ("USER:\r\nEND\r\n\r\n", ("USER:", "END")),
        ("USER:\nUSER:\r\n", ("USER:",)),
        (["a", "a", "", "b\\n"], ("a", "b\n")),
        (("q",), ("q",)),
    ],
)
def test_parse_stop_words(text, expected: tuple[str, ...]) -> None:
    assert parse_stop_words(text) == expected


def test_parse_stop_words_rejects_non_strings() -> None:
    with pytest.raises(InvalidSettings) as caught:
        parse_stop_words(["ok", 5])
    assert caught.value.field == "stop_words"
