"""The Caption tab: upload, paste or snap an image, optionally ask about it, get a caption."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from backend.contracts import IMAGES_OFF
from backend.errors import BadInput
from backend.settings import ServerLimits, request_settings
from backend.zero_gpu import on_gpu
from ui.handlers import BEAM_NOTE, failure_message, metered_vision, report

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
EXAMPLE_ROWS = [
    [str(EXAMPLES / "house.png"), ""],
    [str(EXAMPLES / "chessboard.png"), "What pattern is this?"],
    [str(EXAMPLES / "smiley.jpg"), "Describe the face."],
]


@dataclass(frozen=True)
class CaptionTab:
    image: gr.Image
    prompt: gr.Textbox
    run: gr.Button
    stop: gr.Button
    output: gr.Textbox
    stats: gr.Markdown


def build_caption_tab(limits_text: str) -> CaptionTab:
    """Call where the tab goes; `limits_text` says which images are accepted."""
    with gr.Tab("Caption", id="caption"):
        with gr.Row():
            image = gr.Image(
                type="filepath",
                sources=["upload", "clipboard", "webcam"],
                label="Image",
                elem_id="caption-image",
            )
            with gr.Column():
                prompt = gr.Textbox(
                    label="Question (optional)",
                    elem_id="caption-prompt",
                    lines=1,  # Enter captions, Shift+Enter adds a line (lines > 1 would swap them)
                    max_lines=6,
                    placeholder="Empty for a caption, or ask e.g. 'What colour is the house?'; Enter runs it",
                    html_attributes=gr.InputHTMLAttributes(enterkeyhint="go"),
                )
                output = gr.Textbox(label="Caption", elem_id="caption-output", lines=4, interactive=False)
                stats = gr.Markdown(elem_id="caption-stats", elem_classes="stats")
                with gr.Row():
                    run = gr.Button("Caption", variant="primary", elem_id="caption-run")
                    stop = gr.Button("Stop", variant="stop", elem_id="caption-stop")
        gr.Markdown(f"{limits_text} Uses the generation settings on the right.", elem_classes="stats")
        gr.Examples(EXAMPLE_ROWS, inputs=[image, prompt], label="Examples")
    return CaptionTab(image, prompt, run, stop, output, stats)


def caption_image(
    vision, limits: ServerLimits, image: str | None, prompt: str, values: dict[str, Any]
) -> Iterator[tuple[str, str]]:
    """Yield (caption so far, stats line)."""
    try:
        if vision is None:
            raise BadInput(IMAGES_OFF)
        if not image:
            raise BadInput("No image: upload, paste or take one first.")
        settings = request_settings(values, limits)
        replies = vision.caption(image, prompt or "", settings)
    except Exception as error:
        report(error)
        yield "", f"⚠️ {failure_message(error)}"
        return
    yield "", "⏳ " + (BEAM_NOTE if settings.mode == "beam" else "Looking…")
    reply = None
    try:
        for reply in replies:
            yield reply.text, "⏳ So far: " + reply.stats_line()
    except Exception as error:
        report(error)
        yield (reply.text if reply else ""), f"⚠️ {failure_message(error)}"
        return
    if reply is not None:
        yield reply.text, f"{reply.stats_line()} · {vision.holder.loaded_name}"


def wire_caption(
    vision, limits: ServerLimits, tab: CaptionTab, controls: dict, generation: dict, rate_limit=None
) -> None:
    @on_gpu
    def on_caption(data, request: gr.Request = None):
        values = {name: data[component] for name, component in controls.items()}
        captioning = metered_vision(vision, rate_limit, request)
        yield from caption_image(captioning, limits, data[tab.image], data[tab.prompt], values)

    inputs = {tab.image, tab.prompt} | set(controls.values())
    events = [
        tab.run.click(on_caption, inputs, [tab.output, tab.stats], **generation),
        tab.prompt.submit(on_caption, inputs, [tab.output, tab.stats], **generation),
    ]
    tab.stop.click(None, None, None, cancels=events)
