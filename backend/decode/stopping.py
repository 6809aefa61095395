"""Stop words on decoded text: cut at the first stop word, never show a partial one.

Our own because transformers' StopStringCriteria only ends generation; it does not tell a
streaming UI which characters are safe to show, nor where to cut the final text.
"""

from __future__ import annotations

from dataclasses import dataclass

# A byte-level tokenizer decodes an incomplete UTF-8 sequence to U+FFFD; wait for the rest.
REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True)
class StopCut:
    visible: str  # text that may be shown now and will never be taken back
    stopped: bool  # a stop word was found; `visible` ends right before it


class StopWordMatcher:
    """Feeds on the whole decoded continuation so far; stop words may span tokens or start mid-token."""

    def __init__(self, stop_words: tuple[str, ...] | list[str]):
        self.stop_words = tuple(w for w in stop_words if w)
        self._longest = max((len(w) for w in self.stop_words), default=0)

    def feed(self, text: str, final: bool = False) -> StopCut:
        """Return what of `text` is safe to show. With final=True nothing more will come."""
        first = self.first_stop(text)
        if first is not None:
            return StopCut(text[:first], True)
        if final:
            return StopCut(text, False)
        hold = self._held_suffix_len(text)
        return StopCut(text[: len(text) - hold].rstrip(REPLACEMENT_CHAR), False)

    def first_stop(self, text: str) -> int | None:
        positions = [i for i in (text.find(w) for w in self.stop_words) if i >= 0]
        return min(positions) if positions else None

    def _held_suffix_len(self, text: str) -> int:
        """Length of the longest end of `text` that could still grow into a stop word."""
        for size in range(min(self._longest - 1, len(text)), 0, -1):
            tail = text[-size:]
            if any(w.startswith(tail) for w in self.stop_words):
                return size
        return 0


def safe_decode(tokenizer, token_ids: list[int]) -> str:
    """Decode, dropping ids the tokenizer cannot map (the 'piece id is out of range' crash)."""
    vocab_size = len(tokenizer)
    valid = [int(t) for t in token_ids if 0 <= int(t) < vocab_size]
    return tokenizer.decode(valid, skip_special_tokens=True)
