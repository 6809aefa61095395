"""The JSON the OpenAI-compatible API answers with, built from our Reply streams (no web framework).

Shape makes chat.completion(.chunk) and text_completion bodies; Interleaved runs n choices as one
stream; Started counts a request's prompt tokens for `usage`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from backend.replies import Reply


class Interleaved:
    """Round-robin over several reply streams as (choice index, reply); close() closes them all."""

    def __init__(self, streams: list[Iterator[Reply]]):
        self._streams = streams
        self._active = list(range(len(streams)))
        self._turn = 0

    def __iter__(self) -> Interleaved:
        return self

    def __next__(self) -> tuple[int, Reply]:
        while self._active:
            slot = self._turn % len(self._active)
            index = self._active[slot]
            reply = next(self._streams[index], None)
            if reply is None:
                self._active.pop(slot)
                continue
            self._turn = slot + 1
            return index, reply
        raise StopIteration

    def close(self) -> None:
        close_all(self._streams)


def close_all(streams) -> None:
    for stream in streams:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def finish_reason(reply: Reply) -> str:
    return "length" if reply.finish_reason == "length" else "stop"


@dataclass
class Started:
    """The running choices of one request: `choices_per_prompt` consecutive streams per prompt."""

    streams: list[Iterator[Reply]]
    choices_per_prompt: int

    def prompt_tokens(self, finals: dict[int, Reply]) -> int:
        """Each prompt's size, as its engine put it on the replies (0 where one did not)."""
        total = 0
        for first in range(0, len(self.streams), self.choices_per_prompt):
            sizes = [
                finals[i].prompt_tokens for i in range(first, first + self.choices_per_prompt) if i in finals
            ]
            total += next((size for size in sizes if size is not None), 0)
        return total


@dataclass
class Shape:
    """The JSON of one response: chat.completion(.chunk) or text_completion."""

    chat: bool
    model: str
    prefixes: list[str] = field(default_factory=list)  # echo: the prompt shown before each choice
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, choices: list[dict], chunk: bool) -> dict:
        kind = "chat.completion" + (".chunk" if chunk else "") if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def chunk(self, index: int, text: str, first: bool, finish: str | None = None) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            prefix = self.prefixes[index] if first and self.prefixes else ""
            choice = {"index": index, "text": prefix + text, "logprobs": None, "finish_reason": finish}
        return self._envelope([choice], chunk=True)

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._envelope([], chunk=True), "usage": usage}

    def whole(self, finals: dict[int, Reply], usage: dict) -> dict:
        choices = []
        for index, reply in sorted(finals.items()):
            choice = {
                "index": index,
                "logprobs": None,
                "finish_reason": finish_reason(reply),
                "seed": reply.seed,
            }
            if self.chat:
                choice["message"] = {"role": "assistant", "content": reply.text}
            else:
                choice["text"] = (self.prefixes[index] if self.prefixes else "") + reply.text
            choices.append(choice)
        return {**self._envelope(choices, chunk=False), "usage": usage, "system_fingerprint": None}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def usage_of(prompt_tokens: int, finals: dict[int, Reply]) -> dict:
    completion = sum(reply.new_tokens for reply in finals.values())
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }
