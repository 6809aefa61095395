"""--log-prompts: each request's prompt and final reply at INFO, from this one place.

Off by default: prompts and replies are the users' business. `PromptLog.around(service)` wraps the
chat or vision service that both the UI and /v1 use; every other attribute passes through unchanged.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import replace

from backend.replies import Reply

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


class PromptLog:
    """`service` (a chat or vision service, local or remote) with its generation requests logged."""

    def __init__(self, service):
        self._service = service

    @classmethod
    def around(cls, service):
        return None if service is None else cls(service)

    def __getattr__(self, name: str):
        return getattr(self._service, name)

    def _logged(self, kind: str, prompt: str, start: Callable):
        number = next(_numbers)
        log.info("Request %d %s: %r", number, kind, prompt)
        try:
            return number, start()
        except Exception as error:
            log.info("Request %d refused: %s", number, error)
            raise

    def chat(self, message, history, settings):
        number, replies = self._logged(
            "chat", message, lambda: self._service.chat(message, history, settings)
        )
        return LoggedReplies(replies, number)

    def complete(self, text, settings):
        number, replies = self._logged("completion", text, lambda: self._service.complete(text, settings))
        return LoggedReplies(replies, number)

    def caption(self, image_source, prompt, settings):
        number, replies = self._logged(
            "caption", prompt, lambda: self._service.caption(image_source, prompt, settings)
        )
        return LoggedReplies(replies, number)

    def visual_chat(self, message, image_source, history, settings, pipeline="auto"):
        number, result = self._logged(
            "image chat",
            message,
            lambda: self._service.visual_chat(message, image_source, history, settings, pipeline),
        )
        return replace(result, replies=LoggedReplies(result.replies, number))
