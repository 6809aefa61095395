"""Chat turns that involve an image: either pipeline of backend.services.vision, shown in the chat."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from backend.contracts import IMAGES_OFF, takes_conversation_images
from backend.errors import BadInput
from backend.images import ConversationImages
from backend.settings import ServerLimits, request_settings
from ui.chat_text import shown
from ui.handlers import refusal, stream_reply
from ui.messages import (
    caption_note,
    history_to_turns,
    image_paths,
    is_caption_note,
    is_note,
    latest_image,
)

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
            raise BadInput(IMAGES_OFF)
        settings = request_settings(values, limits)
        images = images_to_send(vision, history, new_images, pipeline)
        result = vision.visual_chat(message, images, history_to_turns(history), settings, pipeline)
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


def images_to_send(vision, history: list[dict], new_images: list[str], pipeline: str):
    """What `vision.visual_chat` gets: the vision model rereads every image of the conversation, each in
    its turn; the captioner describes the new ones only (the history holds the earlier descriptions)."""
    if not takes_conversation_images(vision):
        if len(new_images) > 1:
            raise BadInput("The model server behind this app reads one image per message: attach one.")
        return new_images[-1] if new_images else latest_image(history)
    earlier = images_by_turn(history)
    if vision.choose_pipeline(pipeline) != "vision":
        return ConversationImages.of([()] * (len(earlier) - 1) + [tuple(new_images)])
    return ConversationImages.of(earlier[:-1] + [earlier[-1] + tuple(new_images)])


def images_by_turn(history: list[dict]) -> list[tuple[str, ...]]:
    """The image paths of each turn `history_to_turns(history)` makes, then those of no answered turn yet
    (sent before a reply that never came): they go with the new message, as they did when sent."""
    by_turn: list[tuple[str, ...]] = []
    pending: list[str] = []
    pending_user = False
    for message in history or []:  # the walk of ui.messages.history_to_turns, keeping images
        if not isinstance(message, dict) or is_caption_note(message) or is_note(message):
            continue
        role = message.get("role")
        if role == "user":
            pending_user = True
            pending += image_paths(message.get("content"))
        elif role == "assistant" and pending_user:
            by_turn.append(tuple(pending))
            pending, pending_user = [], False
    return by_turn + [tuple(pending)]
