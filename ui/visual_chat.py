"""Chat turns that involve an image: either pipeline of backend.services.vision, shown in the chat."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from backend.errors import BadInput
from backend.settings import ServerLimits, request_settings
from ui.chat_text import shown
from ui.handlers import refusal, stream_reply
from ui.messages import caption_note, history_to_turns, latest_image

PIPELINE_CHOICES = [
    ("Auto (LLaVA answers itself; other models caption for the chat model)", "auto"),
    ("The vision model answers (LLaVA-style)", "vision"),
    ("Caption → chat model", "caption"),
]
ANSWERED_BY = {"vision": "answered by the vision model", "caption": "image captioned for the chat model"}


def needs_vision_model(vision, history: list[dict], new_images: list[str], pipeline: str) -> bool:
    """New images always do; later turns only while the vision model itself answers."""
    if new_images:
        return True
    if vision is None or latest_image(history) is None:
        return False
    try:
        return vision.choose_pipeline(pipeline) == "vision"
    except Exception:  # the vision model is not loaded yet: the text model carries on
        return False


def visual_turn(
    vision,
    limits: ServerLimits,
    message: str,
    new_images: list[str],
    history: list[dict],
    values: dict[str, Any],
    pipeline: str,
    colour: bool = False,
) -> Iterator[tuple[str, list[dict], str]]:
    """Yield (textbox text, chat history, token view) like ui.handlers.chat_turn."""
    history = list(history or [])
    try:
        if vision is None:
            raise BadInput("Images are turned off on this server (started with --vision-model none).")
        settings = request_settings(values, limits)
        image = new_images[-1] if new_images else latest_image(history)
        result = vision.visual_chat(message, image, history_to_turns(history), settings, pipeline)
    except Exception as error:
        yield refusal(message, history, error)
        return
    shown_images = [{"role": "user", "content": {"path": path}} for path in new_images]
    history = history + shown_images + [{"role": "user", "content": shown(message.strip())}]
    if result.caption is not None:
        history.append(caption_note(f"🖼️ What {vision.holder.loaded_name} sees", shown(result.caption)))
    yield from stream_reply(
        result.replies, history, settings.mode == "beam", colour, ANSWERED_BY[result.pipeline]
    )
