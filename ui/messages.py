"""Between Gradio's chat messages and the backend's turns. Pure functions, no Gradio import."""

from __future__ import annotations

import html
from typing import Any

from backend.prompting import Turn


def text_of(content: Any) -> str:
    """Gradio 6 gives message content as a list of parts; older clients send a plain string."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", "")) if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(text_of(part) for part in content)
    return ""


def is_note(message: dict) -> bool:
    """Our stats, notices and errors are titled messages; they are shown, never sent to the model."""
    metadata = message.get("metadata") or {}
    return bool(metadata.get("title"))


def history_to_turns(history: list[dict]) -> list[Turn]:
    """Pair each user message with the assistant reply after it; unanswered messages are left out."""
    turns: list[Turn] = []
    pending_user: str | None = None
    for message in history or []:
        if not isinstance(message, dict) or is_note(message):
            continue
        # The UI escapes what it shows (see ui.handlers.shown); the model gets the text as typed.
        role, text = message.get("role"), html.unescape(text_of(message.get("content")))
        if role == "user":
            pending_user = text
        elif role == "assistant" and pending_user is not None:
            turns.append(Turn(pending_user, text))
            pending_user = None
    return turns


def note(title: str, body: str = "") -> dict:
    return {"role": "assistant", "content": body, "metadata": {"title": title, "status": "done"}}
