"""Settings in words: the numbers line under a reply, and the heads of a comparison. No Gradio import."""

from __future__ import annotations

import html

from backend.settings import GenerationSettings

# The fields that shape a reply in each mode, in the order they are listed.
MODE_FIELDS = {
    "sample": ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens"),
    "greedy": ("repetition_penalty", "max_new_tokens"),
    "beam": ("num_beams", "repetition_penalty", "max_new_tokens"),
}
UI_FIELDS = ("seed", "mode", *MODE_FIELDS["sample"], "num_beams", "stop_words", "adapter", "system_prompt")


def clipped(text: str, limit: int = 40) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def phrase(settings: GenerationSettings, name: str) -> str:
    """One setting as the numbers line says it, e.g. 'temperature 0.7' or 'top-k off'."""
    value = getattr(settings, name)
    if name == "seed":
        return "seed random" if value < 0 else f"seed {value}"
    if name == "mode":
        return str(value)
    if name == "temperature":
        return f"temperature {value:g}"
    if name == "top_k":
        return "top-k off" if value == 0 else f"top-k {value}"
    if name == "top_p":
        return "top-p off" if value >= 1.0 else f"top-p {value:g}"
    if name == "repetition_penalty":
        return f"repetition penalty {value:g}"
    if name == "max_new_tokens":
        return f"max {value} tokens"
    if name == "num_beams":
        return f"{value} beams"
    if name == "stop_words":
        words = ", ".join(f"“{clipped(word, 16)}”" for word in value)
        return f"stops at {words}" if value else "no stop words"
    if name == "adapter":
        return f"adapter {value}" if value else "base model"
    if name == "system_prompt":
        return f"system prompt “{clipped(value)}”"
    raise KeyError(name)


def shaping_fields(settings: GenerationSettings) -> list[str]:
    """What shaped a reply besides its seed and mode; stop words and an adapter only when set."""
    names = list(MODE_FIELDS[settings.mode])
    return names + [name for name in ("stop_words", "adapter") if getattr(settings, name)]


def settings_line(settings: GenerationSettings) -> str:
    """The settings part of a reply's numbers line (the stats line already says the seed and the mode)."""
    return " · ".join(phrase(settings, name) for name in shaping_fields(settings))


def differing(a: GenerationSettings, b: GenerationSettings) -> list[str]:
    return [name for name in UI_FIELDS if getattr(a, name) != getattr(b, name)]


def compare_headers(a: GenerationSettings, b: GenerationSettings) -> tuple[str, str]:
    """HTML for the heads of the two columns: each side's settings, those that differ marked."""
    marked = set(differing(a, b))
    heads = []
    for label, settings in (("A", a), ("B", b)):
        names = ["seed", "mode", *shaping_fields(settings)]
        names += [name for name in UI_FIELDS if name in marked and name not in names]
        parts = []
        for name in names:
            text = html.escape(phrase(settings, name))
            parts.append(f'<mark data-setting="{name}">{text}</mark>' if name in marked else text)
        heads.append(f"<p><b>{label}</b> · " + " · ".join(parts) + "</p>")
    return heads[0], heads[1]
