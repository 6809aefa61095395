"""Conversations as JSON files: export with their settings, import with every field checked."""

from __future__ import annotations

import json
import time
from typing import Any

from backend.errors import BadInput, InvalidSettings
from backend.settings import GenerationSettings, ServerLimits

FORMAT = "chat-caption-playground/conversation"
VERSION = 1
MAX_FILE_BYTES = 2 * 2**20
MAX_MESSAGES = 1000
ROLES = ("user", "assistant")


def export_conversation(messages: list[dict[str, str]], settings: dict[str, Any], model: str) -> dict:
    """`messages` are {"role", "content"} with plain text; `settings` as GenerationSettings.to_dict()."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": model,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": settings,
        "messages": messages,
    }


def parse_conversation(raw: bytes, limits: ServerLimits) -> tuple[list[dict[str, str]], GenerationSettings]:
    """Messages and settings from an exported file; BadInput says what is wrong with it."""
    if len(raw) > MAX_FILE_BYTES:
        raise BadInput(
            f"The file is {len(raw):,} bytes; conversations up to {MAX_FILE_BYTES:,} bytes import."
        )
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadInput(f"The file is not valid JSON ({error}).") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BadInput("This is not a conversation exported from this playground (no 'format' marker).")
    if data.get("version") != VERSION:
        raise BadInput(f"Conversation version {data.get('version')!r} is not supported; expected {VERSION}.")
    messages = data.get("messages")
    if not isinstance(messages, list) or len(messages) > MAX_MESSAGES:
        raise BadInput(f"'messages' must be a list of at most {MAX_MESSAGES} messages.")
    checked = [check_message(index, message, limits) for index, message in enumerate(messages)]
    settings_data = data.get("settings", {})
    if not isinstance(settings_data, dict):
        raise BadInput("'settings' must be an object.")
    try:
        settings = GenerationSettings.from_inputs(settings_data, limits)
    except InvalidSettings as error:
        raise BadInput(f"The file's settings are invalid: {error}") from None
    return checked, settings


def check_message(index: int, message: Any, limits: ServerLimits) -> dict[str, str]:
    if not isinstance(message, dict):
        raise BadInput(f"Message {index + 1} is not an object.")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise BadInput(f"Message {index + 1} has role {role!r}; expected one of {', '.join(ROLES)}.")
    if not isinstance(content, str):
        raise BadInput(f"Message {index + 1} has no text content.")
    if len(content) > limits.max_input_chars * 4:
        raise BadInput(f"Message {index + 1} is {len(content):,} characters, too long to import.")
    return {"role": role, "content": content}
