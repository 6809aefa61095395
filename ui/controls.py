"""The generation controls: one Gradio input per GenerationSettings field, with help texts."""

from __future__ import annotations

import gradio as gr

from backend.settings import MODES, GenerationSettings, ServerLimits

DEFAULTS = GenerationSettings()


def build_controls(limits: ServerLimits) -> dict[str, gr.components.Component]:
    """Create the controls inside the current Blocks context, keyed by settings field name."""
    controls: dict[str, gr.components.Component] = {}
    controls["system_prompt"] = gr.Textbox(
        DEFAULTS.system_prompt, label="System prompt", lines=3, info="Sets the assistant's role (chat only)."
    )
    controls["mode"] = gr.Radio(
        list(MODES),
        value=DEFAULTS.mode,
        label="Mode",
        info="sample: random, shaped below · greedy: likeliest token · beam: best of several (not streamed)",
    )
    controls["seed"] = gr.Number(
        DEFAULTS.seed,
        label="Seed",
        precision=0,
        minimum=-1,
        info="-1 draws a new seed each time; the one used is shown under the reply.",
    )
    controls["temperature"] = gr.Slider(
        0.0,
        2.0,
        DEFAULTS.temperature,
        step=0.05,
        label="Temperature",
        info="Higher is more random; 0 is greedy.",
    )
    controls["top_k"] = gr.Slider(
        0, 200, DEFAULTS.top_k, step=1, label="Top-k", info="Keep the k likeliest; 0 = off."
    )
    controls["top_p"] = gr.Slider(
        0.01, 1.0, DEFAULTS.top_p, step=0.01, label="Top-p", info="Keep the likeliest reaching p; 1 = off."
    )
    controls["repetition_penalty"] = gr.Slider(
        1.0, 2.0, DEFAULTS.repetition_penalty, step=0.01, label="Repetition penalty", info="1 = off."
    )
    controls["max_new_tokens"] = gr.Slider(
        1,
        limits.max_new_tokens,
        min(DEFAULTS.max_new_tokens, limits.max_new_tokens),
        step=1,
        label="Max new tokens",
    )
    controls["num_beams"] = gr.Slider(
        1, limits.max_num_beams, DEFAULTS.num_beams, step=1, label="Beams", info="Beam mode only."
    )
    controls["stop_words"] = gr.Textbox(
        "",
        label="Stop words",
        lines=2,
        placeholder="One per line; \\n for a newline",
        info="The reply ends before the first stop word; it is never shown.",
    )
    return controls
