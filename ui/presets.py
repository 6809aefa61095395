"""Presets (named settings plus system prompt) and links to a setup: what they hold, and the checks on
everything read back from a browser's storage, a file or a URL. No Gradio component here.

Whatever is read goes through GenerationSettings.from_inputs, as the chat's own settings do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any
from urllib.parse import urlencode

from backend.conversation_io import read_exported
from backend.errors import BadInput, InvalidSettings
from backend.settings import GenerationSettings, ServerLimits
from ui.controls import control_values, page_defaults

FIELDS = tuple(name for name in GenerationSettings.field_names() if name != "logprobs")  # the UI's controls
BUILT_IN: dict[str, dict[str, Any]] = {
    "precise": {"temperature": 0.2, "top_p": 0.9},
    "balanced": {},  # the defaults
    "creative": {"temperature": 1.1, "top_p": 0.98, "top_k": 0},
}
PRESETS_FORMAT = "chat-caption-playground/presets"
PRESETS_VERSION = 1
MAX_PRESETS = 50
MAX_NAME_CHARS = 40
MAX_PRESETS_FILE_BYTES = 256 * 1024
MESSAGE_PARAMETER = "message"  # a link's text for the message box; the settings use their field names


def built_in(name: str, limits: ServerLimits) -> dict[str, Any]:
    """A built-in preset as control values: the defaults with its changes. It leaves the seed alone: a
    style of sampling, not one particular draw."""
    values = control_values(replace(page_defaults(limits), **BUILT_IN[name]))
    return {field: values[field] for field in FIELDS if field != "seed"}


def checked_values(values: Any, limits: ServerLimits) -> dict[str, Any]:
    """The control values `values` gives, checked as one set of settings (the fields it leaves out at the
    page's defaults); raises InvalidSettings or BadInput saying what is wrong."""
    if not isinstance(values, Mapping):
        raise BadInput("A preset must be an object of settings.")
    unknown = sorted(str(name) for name in set(values) - set(FIELDS))
    if unknown:
        raise InvalidSettings(unknown[0], "is not a setting here")
    settings = GenerationSettings.from_inputs({**page_defaults(limits).to_dict(), **values}, limits)
    full = control_values(settings)
    return {name: full[name] for name in FIELDS if name in values}


def check_name(name: Any) -> str:
    """A preset's name as stored; BadInput when it is empty, too long or a built-in one."""
    name = name.strip() if isinstance(name, str) else ""
    if not name:
        raise BadInput("Give the preset a name first.")
    if len(name) > MAX_NAME_CHARS:
        raise BadInput(f"A preset name is at most {MAX_NAME_CHARS} characters.")
    if name.lower() in BUILT_IN:
        raise BadInput(f"'{name}' is a built-in preset; choose another name.")
    return name


def stored_presets(stored: Any, limits: ServerLimits) -> dict[str, dict[str, Any]]:
    """The presets a browser holds, the broken ones left out (they were checked when saved)."""
    kept = {}
    for name, values in (stored or {}).items() if isinstance(stored, Mapping) else ():
        try:
            kept[check_name(name)] = checked_values(values, limits)
        except (BadInput, InvalidSettings):
            continue
    return kept


def presets_file(presets: Mapping[str, Mapping[str, Any]]) -> dict:
    return {"format": PRESETS_FORMAT, "version": PRESETS_VERSION, "presets": dict(presets)}


def read_presets_file(raw: bytes, limits: ServerLimits) -> dict[str, dict[str, Any]]:
    """Every preset in an exported file, checked; BadInput names the first problem and nothing is taken."""
    data = read_exported(raw, MAX_PRESETS_FILE_BYTES, PRESETS_FORMAT, "presets files", "a presets file")
    if data.get("version") != PRESETS_VERSION:
        version = data.get("version")
        raise BadInput(f"Presets version {version!r} is not supported; expected {PRESETS_VERSION}.")
    presets = data.get("presets")
    if not isinstance(presets, dict) or len(presets) > MAX_PRESETS:
        raise BadInput(f"'presets' must be an object of at most {MAX_PRESETS} named presets.")
    checked = {}
    for name, values in presets.items():
        try:
            checked[check_name(name)] = checked_values(values, limits)
        except (BadInput, InvalidSettings) as error:
            raise BadInput(f"Preset '{str(name)[:MAX_NAME_CHARS]}': {error} Nothing was imported.") from None
    return checked


def setup_query(values: Mapping[str, Any], message: str, limits: ServerLimits) -> str:
    """The query string of a link that sets these control values (checked first) and the message box."""
    checked = checked_values({name: values[name] for name in FIELDS if name in values}, limits)
    pairs = [(name, str(value)) for name, value in checked.items()]
    if message:
        limits.check_text("Message", message)
        pairs.append((MESSAGE_PARAMETER, message))
    return urlencode(pairs)


def read_setup(parameters: Mapping[str, str], limits: ServerLimits) -> tuple[dict[str, Any], str | None]:
    """(control values, message) a link's query parameters set; others (Gradio's own) are left alone."""
    values = checked_values({name: parameters[name] for name in FIELDS if name in parameters}, limits)
    message = parameters.get(MESSAGE_PARAMETER)
    if message is not None:
        limits.check_text("The link's message", message)
    return values, message
