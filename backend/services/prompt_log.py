"""--log-prompts: each request's prompt and final reply at INFO, from this one place.

Off by default: prompts and replies are the users' business. `LoggedChat` and `LoggedVision` wrap the
chat and vision services that both the UI and /v1 use, member by member of their Protocols.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import replace

from backend.contracts import ChatBackend, VisionBackend, VisualReply
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


class LoggedChat:
    """A ChatBackend whose chats and completions are logged; the Inspector's calls are not generation."""

    def __init__(self, service: ChatBackend):
        self._service = service
        self.holder, self.limits, self.stats = service.holder, service.limits, service.stats

    @property
    def adapters(self) -> tuple[str, ...]:
        return self._service.adapters

    def queue_stats(self) -> tuple[int, int]:
        return self._service.queue_stats()

    def kv_usage(self):
        return self._service.kv_usage()

    def chat(self, message: str, history: list[Turn], settings: GenerationSettings) -> Iterator[Reply]:
        number, replies = logged(("chat", message), lambda: self._service.chat(message, history, settings))
        return LoggedReplies(replies, number)

    def complete(self, text: str, settings: GenerationSettings) -> Iterator[Reply]:
        number, replies = logged(("completion", text), lambda: self._service.complete(text, settings))
        return LoggedReplies(replies, number)

    def next_tokens(self, text: str, settings: GenerationSettings, n: int):
        return self._service.next_tokens(text, settings, n)

    def step_text(self, text: str, settings: GenerationSettings) -> str:
        return self._service.step_text(text, settings)

    def chat_context(self, history: list[Turn], system_prompt: str) -> str:
        return self._service.chat_context(history, system_prompt)


class LoggedVision:
    """A VisionBackend whose captions and image chats are logged."""

    def __init__(self, service: VisionBackend):
        self._service = service
        self.holder, self.image_limits = service.holder, service.image_limits

    def choose_pipeline(self, requested: str) -> str:
        return self._service.choose_pipeline(requested)

    def caption(self, image_source, prompt: str, settings: GenerationSettings) -> Iterator[Reply]:
        number, replies = logged(
            ("caption", prompt), lambda: self._service.caption(image_source, prompt, settings)
        )
        return LoggedReplies(replies, number)

    def visual_chat(
        self, message: str, image_source, history: list[Turn], settings: GenerationSettings, pipeline="auto"
    ) -> VisualReply:
        number, result = logged(
            ("image chat", message),
            lambda: self._service.visual_chat(message, image_source, history, settings, pipeline),
        )
        return replace(result, replies=LoggedReplies(result.replies, number))
