"""Errors a user can cause, each turned into one clear message at the UI/API edge; and a remote engine's."""

from __future__ import annotations


class UserError(Exception):
    """Base for problems in what the user sent; the message is safe to show as is."""


class InvalidSettings(UserError):
    def __init__(self, field: str, problem: str):
        self.field = field
        super().__init__(f"Invalid setting '{field}': {problem}.")


class BadInput(UserError):
    """The message or text itself is unusable (empty, too long, ...)."""


class ContextOverflow(UserError):
    """The prompt cannot fit the model's context window even after trimming history."""


class ModelNotReady(UserError):
    """The model is still loading or failed to load."""


class BadImage(UserError):
    """An uploaded image that cannot or must not be decoded; the message says which."""


class ServerBusy(UserError):
    """The queue is full; try again shortly."""


class RateLimited(UserError):
    """This client sent more than --rate-limit requests in the last minute."""

    def __init__(self, per_minute: int, retry_after: int):
        self.per_minute, self.retry_after = per_minute, retry_after
        super().__init__(
            f"Rate limit: at most {per_minute} requests per minute; try again in {retry_after} s."
        )


class BackendError(Exception):
    """The backend server failed, or refused this app itself (not the user's request): HTTP 502 at our API."""
