"""The generation controls: one Gradio input per GenerationSettings field, with help texts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import gradio as gr

from backend.settings import MODES, GenerationSettings, ServerLimits

DEFAULTS = GenerationSettings()
# What a disabled control holds: the value that turns its setting off.
NEUTRAL = {"top_k": 0, "repetition_penalty": 1.0, "num_beams": 1}


def page_defaults(limits: ServerLimits) -> GenerationSettings:
    """The settings the page starts with: the defaults, max new tokens within this server's limit."""
    return replace(DEFAULTS, max_new_tokens=min(DEFAULTS.max_new_tokens, limits.max_new_tokens))


def control_values(settings: GenerationSettings) -> dict[str, Any]:
    """The settings as the controls hold them: stop words one per line, a newline in one written \\n."""
    values = settings.to_dict()
    values["stop_words"] = "\n".join(word.replace("\n", "\\n") for word in settings.stop_words)
    return values


def build_controls(
    limits: ServerLimits,
    unsupported: Mapping[str, str] | None = None,
    adapters: Sequence[str] = (),
    elem_prefix: str = "",
) -> dict[str, gr.components.Component]:
    """Create the controls inside the current Blocks context, keyed by settings field name.

    `unsupported` maps fields the engine does not take (a remote backend) to why: those controls are
    disabled at their neutral value with the reason as info; "mode" loses its beam choice instead.
    `adapters`: the LoRA adapters a request may name (the allowlist set at launch); none hides the control.
    `elem_prefix`: for a second set of controls on the page (the Compare tab), so element ids stay unique.
    """
    unsupported = dict(unsupported or {})

    def setting(name: str, value: Any, info: str | None = None) -> dict[str, Any]:
        if name in unsupported and name in NEUTRAL:
            return {"value": NEUTRAL[name], "info": unsupported[name], "interactive": False}
        return {"value": value, "info": info}

    controls: dict[str, gr.components.Component] = {}
    controls["system_prompt"] = gr.Textbox(
        DEFAULTS.system_prompt, label="System prompt", lines=3, info="Sets the assistant's role (chat only)."
    )
    mode_info = (
        "sample: random, shaped below · greedy: likeliest token · beam: best of several (not streamed)"
    )
    controls["mode"] = gr.Radio(
        [mode for mode in MODES if mode != "beam" or "mode" not in unsupported],
        value=DEFAULTS.mode,
        label="Mode",
        info=f"{mode_info} · {unsupported['mode']}" if "mode" in unsupported else mode_info,
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
        0, 200, step=1, label="Top-k", **setting("top_k", DEFAULTS.top_k, "Keep the k likeliest; 0 = off.")
    )
    controls["top_p"] = gr.Slider(
        0.01, 1.0, DEFAULTS.top_p, step=0.01, label="Top-p", info="Keep the likeliest reaching p; 1 = off."
    )
    controls["repetition_penalty"] = gr.Slider(
        1.0,
        2.0,
        step=0.01,
        label="Repetition penalty",
        **setting("repetition_penalty", DEFAULTS.repetition_penalty, "1 = off."),
    )
    controls["max_new_tokens"] = gr.Slider(
        1,
        limits.max_new_tokens,
        min(DEFAULTS.max_new_tokens, limits.max_new_tokens),
        step=1,
        label="Max new tokens",
    )
    controls["num_beams"] = gr.Slider(
        1,
        limits.max_num_beams,
        step=1,
        label="Beams",
        **setting("num_beams", DEFAULTS.num_beams, "Beam mode only."),
    )
    controls["stop_words"] = gr.Textbox(
        "",
        label="Stop words",
        lines=2,
        placeholder="One per line; \\n for a newline",
        info="The reply ends before the first stop word; it is never shown.",
    )
    named = [name for name in adapters if name]
    controls["adapter"] = gr.Dropdown(
        [("none (base model)", "")] + [(name, name) for name in named],
        value=DEFAULTS.adapter,
        label="Adapter",
        info="A LoRA adapter on the chat model, for this request only.",
        visible=bool(named),
        elem_id=f"{elem_prefix}adapter",
    )
    return controls
