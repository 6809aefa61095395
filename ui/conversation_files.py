"""Export the chat (with its settings) to a JSON file and import it back."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import gradio as gr

from backend.conversation_io import export_conversation, parse_conversation
from backend.errors import UserError
from backend.settings import GenerationSettings, ServerLimits
from ui.chat_text import as_typed, shown
from ui.handlers import report
from ui.messages import is_note, text_of


def plain_messages(history: list[dict]) -> list[dict[str, str]]:
    """The conversation as typed and generated: no notes, no display escaping."""
    return [
        {"role": m["role"], "content": as_typed(text_of(m.get("content")))}
        for m in history or []
        if m.get("role") in ("user", "assistant") and not is_note(m)
    ]


def export_chat(history: list[dict], values: dict, model: str, limits: ServerLimits) -> str:
    """Write the export to a fresh temporary file and return its path for download."""
    try:
        settings = GenerationSettings.from_inputs(values, limits).to_dict()
    except UserError:
        settings = GenerationSettings().to_dict()  # the chat matters more than an unfinished slider value
    data = export_conversation(plain_messages(history), settings, model)
    folder = Path(tempfile.mkdtemp(prefix="playground-export-"))
    path = folder / f"conversation-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    return str(path)


def import_chat(path: str | None, limits: ServerLimits, control_names: list[str]) -> list:
    """[history, *control values]; on a bad file, a warning and every output left as it was."""
    unchanged = [gr.update()] * (1 + len(control_names))
    if not path:
        return unchanged
    try:
        messages, settings = parse_conversation(Path(path).read_bytes(), limits)
    except (UserError, OSError) as error:
        report(error if isinstance(error, UserError) else UserError(f"Could not read the file: {error}"))
        return unchanged
    history = [{"role": m["role"], "content": shown(m["content"])} for m in messages]
    values = settings.to_dict()
    values["stop_words"] = "\n".join(w.replace("\n", "\\n") for w in settings.stop_words)
    return [history] + [values[name] for name in control_names]
