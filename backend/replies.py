"""What a chat or completion request streams back: text plus the numbers shown beside it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    text: str  # the whole visible reply so far
    done: bool
    new_tokens: int
    seconds: float
    seed: int
    mode: str
    finish_reason: str | None = None
    notice: str | None = None  # e.g. that old turns were left out to fit the context window
    first_token_seconds: float | None = None
    tokens: tuple = ()  # backend.decode.generation.TokenChoice per generated token, on the final reply only
    queue_position: int | None = None  # while waiting: 1 = next to start
    prompt_tokens: int | None = None  # the prompt's size as the model read it, for API usage counts
    seed_holds: bool | None = None  # the same seed gives this text alone or in any batch; None: not known
    added: tuple = ()  # the TokenChoices this update added (streamed log-probabilities read them)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def stats_line(self) -> str:
        parts = [
            f"{self.new_tokens} tokens",
            f"{self.tokens_per_second:.1f} tok/s",
            f"seed {self.seed}",
            self.mode,
        ]
        if self.first_token_seconds is not None:
            parts.insert(2, f"first token {self.first_token_seconds * 1000:.0f} ms")
        if self.finish_reason:
            parts.append(FINISH_REASONS.get(self.finish_reason, self.finish_reason))
        if self.seed_holds is False:
            parts.append("this seed may give other text when others are served at once")
        return " · ".join(parts)


FINISH_REASONS = {
    "stop_word": "stopped at a stop word",
    "eos": "model ended the reply",
    "length": "hit max new tokens",
}


def replies_from_updates(
    updates: Iterable,
    settings,
    notice: str | None = None,
    prompt_tokens: int | None = None,
    strip_leading_space: bool = True,
    seed_holds: bool | None = None,
) -> Iterator[Reply]:
    """Replies from backend.decode.generation.GenerationUpdate objects of one request with `settings`."""
    tokens = []
    for update in updates:
        if update.queue_position is not None:
            yield Reply("", False, 0, 0.0, settings.seed, settings.mode, queue_position=update.queue_position)
            continue
        if update.token is not None:
            tokens.append(update.token)
        yield Reply(
            text=update.text.lstrip() if strip_leading_space else update.text,
            done=update.finished,
            new_tokens=update.new_tokens,
            seconds=update.seconds,
            seed=settings.seed,
            mode=settings.mode,
            finish_reason=update.finish_reason,
            notice=notice,
            first_token_seconds=update.first_token_seconds,
            tokens=tuple(tokens) if update.finished else (),
            prompt_tokens=prompt_tokens,
            seed_holds=seed_holds,
            added=(update.token,) if update.token is not None else (),
        )


class ReplyStream:
    """The replies of one request and what ends it. Closing or dropping the stream calls `end`,
    also before the first reply, when a generator's own cleanup would never run."""

    def __init__(self, replies: Iterator[Reply], end: Callable[[], object]):
        self._replies = replies
        self._end = end

    def __iter__(self) -> ReplyStream:
        return self

    def __next__(self) -> Reply:
        return next(self._replies)

    def close(self) -> None:
        self._replies.close()
        self._end()

    def __del__(self) -> None:
        self._end()  # harmless once the request has finished
