"""--log-prompts: each request's prompt and final reply at INFO, from this one place.

Off by default: prompts and replies are the users' business. `LoggedChat` and `LoggedVision` wrap the
chat and vision services that both the UI and /v1 use, member by member of their Protocols.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import replace

from backend.contracts import ChatDecorator, VisionDecorator, VisualReply
from backend.prompting import Turn
from backend.replies import Reply
from backend.settings import GenerationSettings

log = logging.getLogger("playground.prompts")
_numbers = itertools.count(1)  # next() on a count is atomic in CPython


class LoggedReplies:
    """A reply stream that logs its final text once, when it ends, fails or is closed."""

    def __init__(self, replies: Iterator[Reply], number: int):
        self._replies, self._number = replies, number
        self._last: Reply | None = None
        self._logged = False

    def __iter__(self) -> LoggedReplies:
        return self

    def __next__(self) -> Reply:
        try:
            reply = next(self._replies)
        except StopIteration:
            self._log("reply")
            raise
        except Exception as error:
            self._log(f"failed ({type(error).__name__}) after")
            raise
        if reply.queue_position is None:
            self._last = reply
        return reply

    def close(self) -> None:
        self._log("stopped; reply so far")
        close = getattr(self._replies, "close", None)
        if close is not None:
            close()

    def _log(self, how: str) -> None:
        if not self._logged:
            self._logged = True
            log.info("Request %d %s: %r", self._number, how, self._last.text if self._last else "")


def logged(what: tuple[str, str], start: Callable):
    """Log `what` (kind, prompt) under a new request number, run `start()`; (number, its result)."""
    kind, prompt = what
    number = next(_numbers)
    log.info("Request %d %s: %r", number, kind, prompt)
    try:
        return number, start()
    except Exception as error:
        log.info("Request %d refused: %s", number, error)
        raise


class LoggedChat(ChatDecorator):
    """A ChatBackend whose chats and completions are logged; the Inspector's calls are not generation."""

    def chat(self, message: str, history: list[Turn], settings: GenerationSettings) -> Iterator[Reply]:
        number, replies = logged(("chat", message), lambda: self.service.chat(message, history, settings))
        return LoggedReplies(replies, number)

    def complete(self, text: str, settings: GenerationSettings) -> Iterator[Reply]:
        number, replies = logged(("completion", text), lambda: self.service.complete(text, settings))
        return LoggedReplies(replies, number)


class LoggedVision(VisionDecorator):
    """A VisionBackend whose captions and image chats are logged."""

    def caption(self, image_source, prompt: str, settings: GenerationSettings) -> Iterator[Reply]:
        number, replies = logged(
            ("caption", prompt), lambda: self.service.caption(image_source, prompt, settings)
        )
        return LoggedReplies(replies, number)

    def visual_chat(
        self, message: str, image_source, history: list[Turn], settings: GenerationSettings, pipeline="auto"
    ) -> VisualReply:
        number, result = logged(
            ("image chat", message),
            lambda: self.service.visual_chat(message, image_source, history, settings, pipeline),
        )
        return replace(result, replies=LoggedReplies(result.replies, number))
