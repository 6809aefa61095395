"""Presets and links to a setup: what they hold, and every value read back checked before it is used."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl

import gradio as gr
import pytest

from backend.errors import BadInput, InvalidSettings
from backend.settings import GenerationSettings, ServerLimits
from ui.controls import build_controls, control_values
from ui.presets import (
    FIELDS,
    MAX_PRESETS,
    built_in,
    check_name,
    checked_values,
    presets_file,
    read_presets_file,
    read_setup,
    setup_query,
    stored_presets,
)
from ui.presets_panel import check_fits

LIMITS = ServerLimits(max_new_tokens=64)


def ui_values(**changes) -> dict:
    values = control_values(GenerationSettings(max_new_tokens=32, **changes))
    return {name: values[name] for name in FIELDS}


def test_built_in_presets_are_the_documented_settings():
    precise, balanced, creative = (built_in(name, LIMITS) for name in ("precise", "balanced", "creative"))
    assert (precise["mode"], precise["temperature"], precise["top_p"]) == ("sample", 0.2, 0.9)
    defaults = GenerationSettings()
    assert balanced["temperature"] == defaults.temperature and balanced["top_k"] == defaults.top_k
    assert balanced["max_new_tokens"] == LIMITS.max_new_tokens  # the default, within this server's limit
    assert (creative["temperature"], creative["top_p"], creative["top_k"]) == (1.1, 0.98, 0)
    assert all("seed" not in preset for preset in (precise, balanced, creative))  # the seed stays as it is
    for preset in (precise, balanced, creative):
        assert checked_values(preset, LIMITS) == preset


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"temperature": "hot"}, "'temperature': must be a number"),
        ({"top_p": 0}, "'top_p'"),
        ({"seed": 1.5}, "'seed': must be a whole number"),
        ({"mode": "nucleus"}, "'mode'"),
        ({"max_new_tokens": 10_000}, "'max_new_tokens'"),
        ({"logprobs": 3}, "'logprobs': is not a setting here"),
        ({"evil": 1}, "'evil'"),
        ({"system_prompt": 5}, "'system_prompt'"),
    ],
)
def test_bad_values_are_refused_naming_the_setting(values, expected):
    with pytest.raises(InvalidSettings, match=expected):
        checked_values(values, LIMITS)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"temperature": "hot"}, "'temperature': must be a number"),
        ({"seed": "1.5"}, "'seed': must be a whole number"),
        ({"top_k": "-1"}, "'top_k'"),
        ({"mode": "beam", "num_beams": "99"}, "'num_beams'"),
        ({"max_new_tokens": "1e9"}, "'max_new_tokens'"),
        ({"stop_words": "x" * 100}, "'stop_words'"),
    ],
)
def test_bad_links_are_refused_naming_the_setting(query, expected):
    with pytest.raises(InvalidSettings, match=expected):
        read_setup({**query, "message": "hi"}, LIMITS)


def test_a_link_round_trips_the_settings_and_the_message():
    values = ui_values(seed=7, temperature=0.2, stop_words=("END", "\n"), system_prompt="Be a pirate & more")
    query = setup_query(values, "Tell me a story\nin two lines", LIMITS)
    parameters = dict(parse_qsl(query, keep_blank_values=True))
    assert parameters["seed"] == "7" and parameters["temperature"] == "0.2"
    read, message = read_setup({**parameters, "__theme": "dark"}, LIMITS)  # Gradio's own are left alone
    assert read == values and message == "Tell me a story\nin two lines"
    assert read_setup({}, LIMITS) == ({}, None)
    assert read_setup({"seed": "3"}, LIMITS) == ({"seed": 3}, None)  # only what the link sets
    with pytest.raises(BadInput, match="characters"):
        read_setup({"message": "x" * 30_000}, LIMITS)
    with pytest.raises(InvalidSettings, match="'top_k'"):
        setup_query(ui_values(top_k=-1), "", LIMITS)


def test_preset_names_and_files():
    assert check_name("  mine ") == "mine"
    for bad, words in [("", "name"), ("x" * 41, "at most"), ("Creative", "built-in")]:
        with pytest.raises(BadInput, match=words):
            check_name(bad)
    presets = {"mine": ui_values(temperature=0.4), "other": ui_values(mode="greedy")}
    raw = json.dumps(presets_file(presets)).encode()
    assert read_presets_file(raw, LIMITS) == presets
    broken = {**presets, "bad": {**ui_values(), "top_p": 9}}
    for data, words in [
        (b"{nope", "not valid JSON"),
        (b"[]", "not a presets file"),
        (json.dumps({**presets_file(presets), "version": 7}).encode(), "version 7"),
        (json.dumps(presets_file(broken)).encode(), "Preset 'bad'.*'top_p'.*Nothing was imported"),
        (json.dumps(presets_file({f"p{i}": {} for i in range(MAX_PRESETS + 1)})).encode(), "at most 50"),
        (json.dumps(presets_file({"precise": {}})).encode(), "built-in"),
    ]:
        with pytest.raises(BadInput, match=words):
            read_presets_file(data, LIMITS)


def test_what_a_browser_holds_is_checked_again():
    kept = stored_presets({"good": ui_values(), "bad": {"top_k": "many"}, "": {}}, LIMITS)
    assert list(kept) == ["good"]
    assert stored_presets("tampered", LIMITS) == {} and stored_presets(None, LIMITS) == {}


def test_values_must_fit_the_controls_of_this_page():
    with gr.Blocks():
        controls = build_controls(LIMITS, unsupported={"top_k": "the server has no top-k"})
    assert check_fits({"temperature": 1.5, "top_k": 40}, controls) == {"temperature": 1.5}  # top-k stays
    with pytest.raises(InvalidSettings, match="'temperature': must be between 0 and 2 here"):
        check_fits(checked_values({"temperature": 5.0}, LIMITS), controls)
    with pytest.raises(InvalidSettings, match="'adapter': 'pirate' is not offered"):
        check_fits(checked_values({"adapter": "pirate"}, LIMITS), controls)
