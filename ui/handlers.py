"""Gradio event handlers: turn UI values into backend calls and backend errors into clear messages.

The conversation is never lost: on any error the history is returned as it was, plus a note.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import gradio as gr

from backend.contracts import ChatBackend, ChatDecorator, VisionBackend, VisionDecorator
from backend.errors import UserError
from backend.settings import ServerLimits, request_settings
from ui.chat_text import as_typed, shown
from ui.messages import history_to_turns, image_paths, is_note, note, text_of
from ui.settings_text import settings_line
from ui.token_view import tokens_html

log = logging.getLogger(__name__)

BEAM_NOTE = "Beam search runs to the end before showing anything (it cannot stream)."


def failure_message(error: Exception) -> str:
    if isinstance(error, UserError):
        return str(error)
    return f"Generation failed ({type(error).__name__}: {error}). Your conversation is kept; try again."


def chat_turn(
    service,
    limits: ServerLimits,
    message: str,
    history: list[dict],
    values: dict[str, Any],
    colour: bool = False,
) -> Iterator[tuple[str, list[dict], str]]:
    """Yield (textbox value, chat history, token view) as the reply streams in."""
    history = list(history or [])
    try:
        settings = request_settings(values, limits)
        if colour and settings.mode != "beam":  # a backend server reports token numbers only when asked
            settings = replace(settings, logprobs=max(settings.logprobs, COLOURED_ALTERNATIVES))
        replies = service.chat(message, history_to_turns(history), settings)
    except Exception as error:  # nothing started: keep the typed message so it can be fixed and resent
        yield refusal(message, history, error)
        return
    history = history + [{"role": "user", "content": shown(message.strip())}]
    yield from stream_reply(replies, history, settings.mode == "beam", colour, settings=settings)


COLOURED_ALTERNATIVES = 3  # alternatives a coloured reply's hover lists


def refusal(message: str, history: list[dict], error: Exception) -> tuple[str, list[dict], str]:
    report(error)
    return message, history + [note(f"⚠️ {failure_message(error)}")], ""


def stream_reply(
    replies, history: list[dict], beam: bool, colour: bool, answered_by: str = "", settings=None
) -> Iterator[tuple[str, list[dict], str]]:
    """Show the reply growing after `history`; failures keep what came and add a note.

    With `settings`, the numbers line under the reply also says them: each retried version keeps its own.
    """
    pending = note(f"⏳ {BEAM_NOTE}") if beam else {"role": "assistant", "content": ""}
    yield "", history + [pending], ""
    reply = None
    try:
        for reply in replies:
            if reply.queue_position:
                yield (
                    "",
                    history + [note(f"⏳ Waiting for a free slot: number {reply.queue_position} in line")],
                    "",
                )
                continue
            yield "", history + [{"role": "assistant", "content": shown(reply.text)}], ""
    except Exception as error:
        report(error)
        partial = [{"role": "assistant", "content": shown(reply.text)}] if reply and reply.text else []
        yield "", history + partial + [note(f"⚠️ {failure_message(error)}")], ""
        return
    if reply is None:
        return
    notes = [note(f"ℹ️ {reply.notice}")] if reply.notice else []
    answer = {"role": "assistant", "content": shown(reply.text)}
    stats = reply.stats_line() + (f" · {settings_line(settings)}" if settings else "")
    stats += f" · {answered_by}" if answered_by else ""
    view = tokens_html(reply.tokens, reply.text) if colour else ""
    yield "", history + [answer, note(stats)] + notes, view


def last_user_index(history: list[dict], before: int) -> int | None:
    """Index of the last user message at or before `before`."""
    for index in range(min(before, len(history) - 1), -1, -1):
        if history[index].get("role") == "user" and not is_note(history[index]):
            return index
    return None


# (message, its images, the history before them) -> that turn answered by the vision model, or None when
# the chat model answers it (ui.layout decides as it does for a new message).
VisualTurn = Callable[[str, list[str], list[dict]], Iterator | None]


def regenerate(
    service,
    limits,
    history,
    index: int,
    values,
    colour=False,
    new_text: str | None = None,
    visual: VisualTurn | None = None,
):
    """Retry (or, with `new_text`, edit) from the user message at or before `index`. A turn sent with
    images goes again with them, to the model that `visual` picks, as when it was first sent."""
    history = list(history or [])
    start = last_user_index(history, index)
    if start is None:
        yield "", history, ""
        return
    message = new_text if new_text is not None else as_typed(text_of(history[start]["content"]))
    first = start
    while first > 0 and _images_only(history[first - 1]):  # the images sent with this message
        first -= 1
    images = [path for sent in history[first:start] for path in image_paths(sent.get("content"))]
    turns = visual(message, images, history[:first]) if visual is not None else None
    if turns is None:
        turns = chat_turn(service, limits, message, history[:start], values, colour)
    yield from turns


def _images_only(message: dict) -> bool:
    """A user message that holds images and no text: how the chat shows the images sent with a message."""
    content = message.get("content")
    return message.get("role") == "user" and bool(image_paths(content)) and not text_of(content).strip()


def undo(history: list[dict], index: int) -> tuple[str, list[dict]]:
    """Drop the message at `index` and everything after it; its text goes back to the textbox."""
    start = last_user_index(list(history or []), index)
    if start is None:
        return "", history
    return as_typed(text_of(history[start]["content"])), list(history[:start])


def complete_text(
    service, limits: ServerLimits, text: str, values: dict[str, Any]
) -> Iterator[tuple[str, str]]:
    """Notebook style: the continuation is written into the same box. Yields (text, stats)."""
    try:
        settings = request_settings(values, limits)
        replies = service.complete(text, settings)
    except Exception as error:
        report(error)
        yield text, f"⚠️ {failure_message(error)}"
        return
    yield text, "⏳ " + (BEAM_NOTE if settings.mode == "beam" else "Generating…")
    reply = None
    try:
        for reply in replies:
            if reply.queue_position:
                yield text, f"⏳ Waiting for a free slot: number {reply.queue_position} in line"
                continue
            yield text + reply.text, "⏳ So far: " + reply.stats_line()
    except Exception as error:
        report(error)
        yield text + (reply.text if reply else ""), f"⚠️ {failure_message(error)}"
        return
    if reply is not None:
        yield text + reply.text, reply.stats_line()


def report(error: Exception) -> None:
    """Users see a toast; unexpected failures also go to the server log with their traceback."""
    if isinstance(error, UserError):  # expected: one line, no traceback to bury real failures under
        log.warning("Refused a request (%s): %s", type(error).__name__, error)
    else:
        log.exception("Request failed", exc_info=error)
    gr.Warning(failure_message(error))


def api_stream(replies_factory) -> Iterator[str]:
    """For the named API endpoints: stream the text, turn failures into gr.Error with the message."""
    try:
        replies = replies_factory()
        text = ""
        for reply in replies:
            # API callers get text only (Gradio's own queue reports positions), but the text so far is
            # yielded while waiting too: Gradio can close a generator only between yields, and a
            # cancelled request must leave the engine's queue then, not once its turn comes.
            text = text if reply.queue_position else reply.text
            yield text
    except UserError as error:
        log.warning("Refused an API request (%s): %s", type(error).__name__, error)
        raise gr.Error(str(error), print_exception=False) from None  # the line above says it, once
    except Exception as error:
        log.exception("API request failed")
        raise gr.Error(failure_message(error)) from None


class MeteredChat(ChatDecorator):
    """A ChatBackend whose generating calls first pass `admit` (it raises RateLimited past --rate-limit)."""

    def __init__(self, service: ChatBackend, admit: Callable[[], None]):
        super().__init__(service)
        self._admit = admit

    def chat(self, message, history, settings):
        self._admit()
        return super().chat(message, history, settings)

    def complete(self, text, settings):
        self._admit()
        return super().complete(text, settings)

    def next_tokens(self, text, settings, n):
        self._admit()
        return super().next_tokens(text, settings, n)


class MeteredVision(VisionDecorator):
    """A VisionBackend whose captions and image chats first pass `admit`."""

    def __init__(self, service: VisionBackend, admit: Callable[[], None]):
        super().__init__(service)
        self._admit = admit

    def caption(self, image_source, prompt, settings):
        self._admit()
        return super().caption(image_source, prompt, settings)

    def visual_chat(self, message, image_source, history, settings, pipeline="auto"):
        self._admit()
        return super().visual_chat(message, image_source, history, settings, pipeline)


def metered_chat(service: ChatBackend, rate_limit, request: gr.Request | None) -> ChatBackend:
    """`service` as this request may use it: counted against its client's budget; as is without a limit."""
    if rate_limit is None:
        return service
    return MeteredChat(service, lambda: rate_limit.admit(request))


def metered_vision(service: VisionBackend | None, rate_limit, request: gr.Request | None):
    """The same for the vision service (None when images are off)."""
    if service is None or rate_limit is None:
        return service
    return MeteredVision(service, lambda: rate_limit.admit(request))
