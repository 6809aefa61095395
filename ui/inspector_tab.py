"""The Inspector tab: what the settings do to the next-token distribution, live."""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass

import gradio as gr

from backend.errors import BadInput, UserError
from backend.settings import GenerationSettings, ServerLimits, request_settings
from backend.zero_gpu import on_gpu
from ui.handlers import failure_message, report
from ui.inspector_view import distribution_html
from ui.messages import history_to_turns

log = logging.getLogger(__name__)

LIVE_CONTROLS = ("mode", "seed", "temperature", "top_k", "top_p", "repetition_penalty")
EMPTY_VIEW = "<p>Type a text and press <b>Show next tokens</b>.</p>"
# A click (or Enter) on a listed token's row sends its id and raw text to `on_pick`, as the view's click
# event. Registered once on the component's root, so it holds for every list rendered into it.
PICK_JS = """
const pick = (event) => {
  const row = event.target.closest('tr[data-token-id]');
  if (!row || !element.contains(row)) return false;
  trigger('click', {token_id: Number(row.dataset.tokenId), token_text: row.dataset.tokenText});
  return true;
};
element.addEventListener('click', pick);
element.addEventListener('keydown', (event) => {
  if ((event.key === 'Enter' || event.key === ' ') && pick(event)) event.preventDefault();
});
"""
PICK_CSS = """
tr[data-token-id] { cursor: pointer; }
tr[data-token-id]:hover td, tr[data-token-id]:focus td { background: var(--color-accent-soft); }
"""


def error_html(error: Exception) -> str:
    return f'<p class="error">⚠️ {html.escape(failure_message(error))}</p>'


@dataclass(frozen=True)
class InspectorTab:
    text: gr.Textbox
    count: gr.Slider
    show: gr.Button
    step: gr.Button
    from_chat: gr.Button
    view: gr.HTML


def build_inspector_tab() -> InspectorTab:
    """Call where the tab goes; wire it with `wire_inspector` once the settings panel exists."""
    with gr.Tab("Inspector", id="inspector"):
        gr.Markdown(
            "The model's next-token probabilities for the text, raw (grey) and after repetition "
            "penalty, temperature, top-k and top-p from the settings panel (orange). Tokens the "
            "settings remove are struck through. Moving a slider updates the picture. Click a listed "
            "token to append it to the text and see what comes after it."
        )
        text = gr.Textbox(label="Text (raw, no chat template)", lines=6, elem_id="inspector-text")
        with gr.Row():
            count = gr.Slider(5, 50, 15, step=1, label="Tokens listed", elem_id="inspector-count")
            show = gr.Button("Show next tokens", variant="primary", elem_id="inspector-show")
            step = gr.Button("Step", elem_id="inspector-step")
            from_chat = gr.Button("Use chat context", elem_id="inspector-from-chat")
        view = gr.HTML(EMPTY_VIEW, elem_id="inspector-view", js_on_load=PICK_JS, css_template=PICK_CSS)
    return InspectorTab(text, count, show, step, from_chat, view)


def wire_inspector(service, limits: ServerLimits, tab: InspectorTab, controls: dict, chatbot) -> None:
    text, count, view = tab.text, tab.count, tab.view
    control_inputs = set(controls.values())

    def settings_of(data) -> GenerationSettings:
        return request_settings({k: data[c] for k, c in controls.items()}, limits)

    def render(data, quiet: bool = False) -> str:
        if not data[text]:
            return EMPTY_VIEW
        try:
            result = service.next_tokens(data[text], settings_of(data), int(data[count]))
        except Exception as error:
            if not quiet:
                report(error)
            elif not isinstance(error, UserError):
                log.exception("Inspector failed")
            return error_html(error)
        return distribution_html(result.to_dict())

    @on_gpu
    def on_show(data):
        return render(data)

    @on_gpu
    def on_live(data):  # a slider moved: errors show in the view, without a toast each time
        return render(data, quiet=True)

    @on_gpu
    def on_step(data):
        try:
            data[text] = service.step_text(data[text], settings_of(data))
        except Exception as error:
            report(error)
            return gr.update(), error_html(error)
        return data[text], render(data)

    @on_gpu
    def on_pick(data, event: gr.EventData):
        try:
            data[text] = with_picked_token(service, data[text] or "", getattr(event, "_data", None))
        except Exception as error:
            report(error)
            return gr.update(), error_html(error)
        return data[text], render(data)

    @on_gpu
    def on_from_chat(data):
        system_prompt = data[controls["system_prompt"]]
        try:
            data[text] = service.chat_context(history_to_turns(data[chatbot]), system_prompt)
        except Exception as error:
            report(error)
            return gr.update(), error_html(error)
        return data[text], render(data)

    inputs = {text, count} | control_inputs
    private = {"api_visibility": "private", "concurrency_id": "inspector"}
    tab.show.click(on_show, inputs, view, **private)
    text.submit(on_show, inputs, view, **private)
    tab.step.click(on_step, inputs, [text, view], **private)
    view.click(on_pick, inputs, [text, view], trigger_mode="once", **private)
    tab.from_chat.click(on_from_chat, inputs | {chatbot}, [text, view], **private)
    for name in LIVE_CONTROLS:
        controls[name].change(on_live, inputs, view, trigger_mode="always_last", **private)


def with_picked_token(service, text: str, picked) -> str:
    """`text` plus the listed token a click picked: by its id where the model says ids (the text it adds
    in context), else (a remote engine's list, ids -1) its listed text."""
    token_id = picked.get("token_id") if isinstance(picked, dict) else None
    token_text = picked.get("token_text") if isinstance(picked, dict) else None
    if not isinstance(token_text, str) or isinstance(token_id, bool) or not isinstance(token_id, int):
        raise BadInput("The clicked token came without its id and text: show the next tokens again.")
    append_token = getattr(service, "append_token", None)
    if token_id >= 0 and append_token is not None:
        return append_token(text, token_id)
    return text + token_text
