"""Typed, validated generation settings: the one object the UI, the API and the engine share.

Pure Python (no torch) so that `ui/` can build and validate it without model code.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

from backend.errors import BadInput, InvalidSettings

Mode = Literal["sample", "greedy", "beam"]
MODES: tuple[str, ...] = ("sample", "greedy", "beam")
MAX_SEED = 2**32 - 1
MAX_STOP_WORDS = 16
MAX_STOP_WORD_CHARS = 64
MAX_SYSTEM_PROMPT_CHARS = 8_000
MAX_ADAPTER_NAME_CHARS = 64
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs allows


@dataclass(frozen=True)
class ServerLimits:
    """Bounds the server enforces on every request, whatever the client sends."""

    max_new_tokens: int = 1024
    max_input_chars: int = 20_000
    max_num_beams: int = 8

    def check_text(self, what: str, text: str) -> None:
        """`what` ("Message", "Text") must be non-blank text within max_input_chars."""
        if not isinstance(text, str) or not text.strip():
            raise BadInput(f"{what} is empty: type something to send.")
        if len(text) > self.max_input_chars:
            raise BadInput(f"{what} is {len(text):,} characters; the limit is {self.max_input_chars:,}.")


@dataclass(frozen=True)
class GenerationSettings:
    """Every knob a user can turn. Defaults are what the UI shows first."""

    seed: int = -1
    mode: Mode = "sample"
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.95
    max_new_tokens: int = 256
    repetition_penalty: float = 1.1
    num_beams: int = 4
    stop_words: tuple[str, ...] = ()
    system_prompt: str = "You are a helpful assistant."
    adapter: str = ""  # a LoRA adapter given at launch (--lora); "" is the base model
    # Log-probabilities each generated token reports (the /v1 API's logprobs): -1 none, else the chosen
    # token's and this many likeliest alternatives', under the model's raw distribution.
    logprobs: int = -1

    def validated(self, limits: ServerLimits) -> GenerationSettings:
        """Return these settings checked against `limits`; raise InvalidSettings naming the field."""
        check_int("seed", self.seed, -1, MAX_SEED)
        if self.mode not in MODES:
            raise InvalidSettings("mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        check_float("temperature", self.temperature, 0.0, 100.0)
        check_int("top_k", self.top_k, 0, 1_000_000)
        check_float("top_p", self.top_p, 0.0, 1.0)
        if self.top_p <= 0.0:
            raise InvalidSettings("top_p", "must be in (0, 1]; 1.0 disables top-p")
        check_int("max_new_tokens", self.max_new_tokens, 1, limits.max_new_tokens)
        check_float("repetition_penalty", self.repetition_penalty, 0.01, 100.0)
        if self.repetition_penalty <= 0:
            raise InvalidSettings("repetition_penalty", "must be > 0; 1.0 disables it")
        check_int("num_beams", self.num_beams, 1, limits.max_num_beams)
        if len(self.stop_words) > MAX_STOP_WORDS:
            raise InvalidSettings("stop_words", f"at most {MAX_STOP_WORDS} stop words")
        for word in self.stop_words:
            if not isinstance(word, str) or not word:
                raise InvalidSettings("stop_words", "stop words must be non-empty strings")
            if len(word) > MAX_STOP_WORD_CHARS:
                raise InvalidSettings("stop_words", f"each at most {MAX_STOP_WORD_CHARS} characters")
        if not isinstance(self.system_prompt, str) or len(self.system_prompt) > MAX_SYSTEM_PROMPT_CHARS:
            raise InvalidSettings("system_prompt", f"must be text of at most {MAX_SYSTEM_PROMPT_CHARS} chars")
        # Which names exist depends on the model: the chat service checks that.
        if not isinstance(self.adapter, str) or len(self.adapter) > MAX_ADAPTER_NAME_CHARS:
            raise InvalidSettings("adapter", f"must be a name of at most {MAX_ADAPTER_NAME_CHARS} chars")
        check_int("logprobs", self.logprobs, -1, MAX_LOGPROBS)
        if self.logprobs >= 0 and self.mode == "beam":
            raise InvalidSettings(
                "logprobs", "are not available with beam search; sample or greedy give them"
            )
        return self

    def with_seed(self) -> GenerationSettings:
        """Draw a concrete seed when the user asked for a random one (-1), so it can be shown."""
        if self.seed >= 0:
            return self
        return replace(self, seed=random.SystemRandom().randint(0, MAX_SEED))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stop_words"] = list(self.stop_words)
        return data

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_inputs(cls, values: Mapping[str, Any], limits: ServerLimits) -> GenerationSettings:
        """Build from loosely typed UI/API values (strings, floats from sliders, None), then validate."""
        unknown = set(values) - set(cls.field_names())
        if unknown:
            raise InvalidSettings(sorted(unknown)[0], "is not a generation setting")
        defaults = cls()
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            raw = values.get(f.name)
            blank = isinstance(raw, str) and raw.strip() == "" and f.name != "system_prompt"
            if raw is None or blank:
                continue
            kwargs[f.name] = _coerce(f.name, raw, type(getattr(defaults, f.name)))
        return cls(**kwargs).validated(limits)


def is_greedy(settings: GenerationSettings) -> bool:
    """Temperature 0 in sample mode means greedy, as in most playgrounds and OpenAI's API."""
    return settings.mode == "greedy" or (settings.mode == "sample" and settings.temperature == 0.0)


def request_settings(values: Mapping[str, Any], limits: ServerLimits) -> GenerationSettings:
    """The edge (UI handlers, the Gradio API, /v1): a request's settings checked once and its seed drawn once.

    Everything below (services, engine, remote client) takes what this returns as given.
    """
    return GenerationSettings.from_inputs(values, limits).with_seed()


def parse_stop_words(text: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Stop words arrive newline-separated from the UI/API; escapes like \\n let users stop on newlines."""
    if text is None:
        return ()
    items = text if isinstance(text, (list, tuple)) else str(text).split("\n")
    words = []
    for item in items:
        if not isinstance(item, str):
            raise InvalidSettings("stop_words", "stop words must be strings")
        # rstrip first: "USER:\r" from a CRLF line is the same stop word as "USER:".
        word = item.rstrip("\r").replace("\\n", "\n").replace("\\t", "\t")
        if word and word not in words:
            words.append(word)
    return tuple(words)


def check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSettings(name, f"must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise InvalidSettings(name, f"must be between {low} and {high}, got {value}")


def check_float(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidSettings(name, f"must be a number, got {value!r}")
    if math.isnan(value) or math.isinf(value):
        raise InvalidSettings(name, f"must be a finite number, got {value}")
    if not low <= value <= high:
        raise InvalidSettings(name, f"must be between {low} and {high}, got {value}")


def _coerce(name: str, raw: Any, kind: type) -> Any:
    if kind is tuple:
        return parse_stop_words(raw)
    if kind is str:
        if not isinstance(raw, str):
            raise InvalidSettings(name, f"must be text, got {raw!r}")
        return raw
    try:
        if kind is int:
            number = float(raw) if isinstance(raw, str) else raw
            if isinstance(number, float):
                if math.isnan(number) or math.isinf(number) or number != int(number):
                    raise InvalidSettings(name, f"must be a whole number, got {raw!r}")
                return int(number)
            return number
        if kind is float:
            return float(raw) if isinstance(raw, str) else raw
    except ValueError:
        raise InvalidSettings(name, f"must be a number, got {raw!r}") from None
    return raw
