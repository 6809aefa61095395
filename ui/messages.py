"""Between Gradio's chat messages and the backend's turns. Pure functions, no Gradio import."""

from __future__ import annotations

from typing import Any

from backend.prompting import Turn, with_image_description
from ui.chat_text import as_typed

CAPTION_NOTE_ID = "image-caption"


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
        if not isinstance(message, dict):
            continue
        if is_caption_note(message) and pending_user is not None:
            # The caption -> chat pipeline: the description stays part of that turn for later replies.
            pending_user = with_image_description(as_typed(text_of(message.get("content"))), pending_user)
            continue
        if is_note(message):
            continue
        # The UI escapes what it shows (see ui.chat_text.shown); the model gets the text as typed.
        role, text = message.get("role"), as_typed(text_of(message.get("content")))
        if role == "user":
            pending_user = text
        elif role == "assistant" and pending_user is not None:
            turns.append(Turn(pending_user, text))
            pending_user = None
    return turns


def note(title: str, body: str = "") -> dict:
    return {"role": "assistant", "content": body, "metadata": {"title": title, "status": "done"}}


def caption_note(title: str, caption: str) -> dict:
    metadata = {"title": title, "status": "done", "id": CAPTION_NOTE_ID}
    return {"role": "assistant", "content": caption, "metadata": metadata}


def is_caption_note(message: dict) -> bool:
    return (message.get("metadata") or {}).get("id") == CAPTION_NOTE_ID


def image_paths(content: Any) -> list[str]:
    """Paths of the images in one message's content, in the shapes Gradio uses."""
    if isinstance(content, dict):
        if content.get("type") == "file":
            content = content.get("file") or {}
        path = content.get("path")
        return [path] if isinstance(path, str) and path else []
    if isinstance(content, (list, tuple)):
        return [path for part in content for path in image_paths(part)]
    return []


def latest_image(history: list[dict]) -> str | None:
    """The newest image a user sent in this conversation, or None."""
    for message in reversed(history or []):
        if isinstance(message, dict) and message.get("role") == "user":
            paths = image_paths(message.get("content"))
            if paths:
                return paths[-1]
    return None
