"""The JSON the OpenAI-compatible API answers with, built from our Reply streams (no web framework).

Shape makes chat.completion(.chunk) and text_completion bodies; Interleaved runs n choices as one
stream; Started counts a request's prompt tokens for `usage`.
"""

from __future__ import annotations

import json
import math
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
    logprobs: bool = False  # the client asked for each token's log-probabilities

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

    def chunk(
        self, index: int, text: str, first: bool, finish: str | None = None, tokens=None, offset: int = 0
    ) -> dict:
        """One choice's next piece; `tokens` (TokenChoice, or None when not asked for) are the tokens
        generated since the last chunk, `offset` where this piece starts in the choice's text."""
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            prefix = self.prefixes[index] if first and self.prefixes else ""
            choice = {"index": index, "text": prefix + text, "logprobs": None, "finish_reason": finish}
        if tokens is not None:
            choice["logprobs"] = self.logprobs(tokens, offset)
        return self._envelope([choice], chunk=True)

    def logprobs(self, tokens, offset: int = 0) -> dict:
        """OpenAI's logprobs object for `tokens`: chat's `content` list or completions' four lists."""
        return chat_logprobs(tokens) if self.chat else completion_logprobs(tokens, offset)

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._envelope([], chunk=True), "usage": usage}

    def whole(self, finals: dict[int, Reply], usage: dict, logprobs: bool = False) -> dict:
        choices = []
        for index, reply in sorted(finals.items()):
            prefix = self.prefixes[index] if self.prefixes else ""
            choice = {
                "index": index,
                "logprobs": self.logprobs(reply.tokens, len(prefix)) if logprobs else None,
                "finish_reason": finish_reason(reply),
                "seed": reply.seed,
            }
            if self.chat:
                choice["message"] = {"role": "assistant", "content": reply.text}
            else:
                choice["text"] = prefix + reply.text
            choices.append(choice)
        return {**self._envelope(choices, chunk=False), "usage": usage, "system_fingerprint": None}


def _finite(logprob: float) -> float:
    """JSON has no -inf: OpenAI (and vLLM) write -9999.0 for a token that could not be drawn."""
    return logprob if math.isfinite(logprob) else -9999.0


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(tokens) -> dict:
    """{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], "refusal": None}.

    `bytes` is null where a backend server did not give them (llama.cpp): never made up from the text.
    """
    content = []
    for token in tokens:
        known = token.utf8 is not None
        content.append(
            {
                "token": token.text,
                "logprob": _finite(token.logprob),
                "bytes": (list(token.utf8) or _utf8(token.text)) if known else None,
                "top_logprobs": [
                    {"token": text, "logprob": _finite(logprob), "bytes": _utf8(text) if known else None}
                    for _, text, logprob in token.top_logprobs
                ],
            }
        )
    return {"content": content, "refusal": None}


def completion_logprobs(tokens, offset: int = 0) -> dict:
    """The legacy shape: parallel lists, each token's text offset counted from the choice's start."""
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token.text)
    return {
        "tokens": [token.text for token in tokens],
        "token_logprobs": [_finite(token.logprob) for token in tokens],
        "top_logprobs": [{text: _finite(lp) for _, text, lp in token.top_logprobs} for token in tokens],
        "text_offset": offsets,
    }


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def usage_of(prompt_tokens: int, finals: dict[int, Reply]) -> dict:
    completion = sum(reply.new_tokens for reply in finals.values())
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }
