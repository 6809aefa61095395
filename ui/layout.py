"""The Blocks layout: banner, the tabs, the shared settings panel, and the events between them."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import gradio as gr

from backend.contracts import IMAGES_OFF
from backend.images import describe_limits
from backend.settings import ServerLimits
from backend.zero_gpu import on_gpu
from ui.api import register_api
from ui.banner import banner_markdown
from ui.branches import empty_tree, grow, path
from ui.caption_tab import build_caption_tab, wire_caption
from ui.chat_text import LATEX_DELIMITERS, as_typed
from ui.compare_tab import build_compare_tab, wire_compare
from ui.controls import build_controls
from ui.conversation_files import export_chat, import_chat_tree
from ui.handlers import (
    chat_turn,
    complete_text,
    last_user_index,
    metered_chat,
    metered_vision,
    regenerate,
    undo,
)
from ui.inspector_tab import build_inspector_tab, wire_inspector
from ui.page import ENTER_GUARD_JS, PAGE_CSS
from ui.presets_panel import build_presets_panel, wire_presets
from ui.system_tab import build_system_tab
from ui.versions import bar_values, build_version_bar, remembered, wire_versions
from ui.visual_chat import PIPELINE_CHOICES, needs_vision_model, visual_turn

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CSS = (ASSETS / "style.css").read_text() + PAGE_CSS
EXAMPLE_PROMPTS = json.loads((ASSETS / "example_prompts.json").read_text())
TITLE = "Chat & caption playground"
MESSAGE_PLACEHOLDER = "Message: Enter sends, Shift+Enter adds a line. Attach an image to ask about it"
SEND_HINT = gr.InputHTMLAttributes(enterkeyhint="send")  # the phone keyboard's Enter key says "send"
EMPTY_BOX = {"text": "", "files": []}


UPLOAD_CACHE = (3600, 86400)  # (how often, how old) in seconds: Gradio deletes older uploads


def build_ui(
    service,
    vision,
    limits: ServerLimits,
    concurrency: int,
    unsupported=None,
    rate_limit=None,
    images_off: str | None = None,
) -> gr.Blocks:
    """`service` is a backend ChatService and `vision` a VisionService, or None when images are off.

    Duck-typed: ui/ never imports torch. `unsupported`: settings a remote backend does not take, and why.
    `rate_limit`: a services.rate_limit.ClientRateLimit that generation requests count against, or None.
    `images_off`: why images are off, shown under the message box (when `vision` is None).
    """
    holder = service.holder
    models = [("chat", holder)] + ([("vision", vision.holder)] if vision else [])

    def loading() -> bool:  # the banner follows until models load and their faster kernels take over
        return any(
            h.status().state == "loading"
            or getattr(h, "kernels_state", lambda: None)() in ("building", "ready")
            for _, h in models
        )

    # Uploads stay on disk while a conversation may still read them; after a day they go, so a Space
    # running for weeks does not fill its disk (every hour, files older than a day).
    with gr.Blocks(title=TITLE, delete_cache=UPLOAD_CACHE) as demo:
        gr.Markdown(f"# {TITLE}", elem_id="title")
        banner_box = gr.Markdown(banner_markdown(models), elem_id="banner")
        with gr.Row():
            with gr.Column(scale=3), gr.Tabs():
                with gr.Tab("Chat", id="chat"):
                    chatbot = gr.Chatbot(
                        elem_id="chatbot",
                        label="Conversation",
                        height=520,
                        editable="user",
                        latex_delimiters=LATEX_DELIMITERS,
                    )
                    message = gr.MultimodalTextbox(
                        elem_id="message",
                        show_label=False,
                        lines=1,  # with lines > 1 Gradio sends on Shift+Enter instead; the box still grows
                        max_lines=10,
                        submit_btn=False,
                        file_types=["image"] if vision else None,
                        file_count="multiple",
                        sources=["upload"] if vision else [],  # no image button where none is read
                        placeholder=MESSAGE_PLACEHOLDER,
                        html_attributes=SEND_HINT,
                    )
                    if vision is None:  # said before anyone tries, not after
                        gr.Markdown(f"ℹ️ {images_off or IMAGES_OFF}", elem_id="images-off")
                    with gr.Row():
                        # min_width: one row on a phone too, so Send stays on the first screen
                        send = gr.Button("Send", variant="primary", elem_id="send", min_width=80)
                        stop = gr.Button("Stop", variant="stop", elem_id="stop", min_width=80)
                        clear = gr.Button("Clear", elem_id="clear", min_width=80)
                    version_bar = build_version_bar()
                    # Every version of the conversation (ui.branches); the Chatbot shows its chosen path.
                    tree = gr.State(empty_tree())
                    gr.Examples(
                        [[{"text": p, "files": []}] for p in EXAMPLE_PROMPTS], inputs=[message], label="Try"
                    )
                    with gr.Row():
                        colour = gr.Checkbox(
                            False, label="Colour the last reply by token probability", elem_id="colour"
                        )
                        pipeline = gr.Dropdown(
                            PIPELINE_CHOICES,
                            value="auto",
                            label="Images go to",
                            elem_id="pipeline",
                            visible=vision is not None,
                        )
                    token_view = gr.HTML(elem_id="token-view")
                    with gr.Row():
                        export_button = gr.Button("Export chat (JSON)", size="sm", elem_id="export")
                        import_button = gr.UploadButton(
                            "Import chat", file_types=[".json"], size="sm", elem_id="import"
                        )
                    exported = gr.File(label="Exported conversation", visible=False, elem_id="exported")
                with gr.Tab("Completion", id="completion"):
                    gr.Markdown("Raw completion: the text is continued as is, with no chat template.")
                    text = gr.Textbox(
                        elem_id="completion-text", lines=14, show_label=False, placeholder="Once upon a time"
                    )
                    completion_stats = gr.Markdown(elem_id="completion-stats", elem_classes="stats")
                    with gr.Row():
                        generate = gr.Button("Generate", variant="primary", elem_id="generate")
                        stop_completion = gr.Button("Stop", variant="stop", elem_id="stop-completion")
                compare_tab = build_compare_tab(limits, unsupported, getattr(service, "adapters", ()))
                caption_tab = build_caption_tab(describe_limits(vision.image_limits)) if vision else None
                inspector = build_inspector_tab()
                switches = build_system_tab(demo, service, vision.holder if vision else None)
            with gr.Column(scale=1, min_width=280):
                with gr.Accordion("Generation settings", open=True, elem_id="settings"):
                    controls = build_controls(limits, unsupported, getattr(service, "adapters", ()))
                presets = build_presets_panel()

        control_inputs = set(controls.values())
        generation = {
            "concurrency_limit": concurrency,
            "concurrency_id": "generation",
            "api_visibility": "private",
        }
        private = {"api_visibility": "private"}

        def values_of(data) -> dict:
            return {name: data[component] for name, component in controls.items()}

        def as_box(text: str, files: list[str]) -> dict:
            """Back into the multimodal box: a refused message keeps its text and images."""
            return {"text": text, "files": files if text else []}

        def by_vision(data, request, text: str, files: list[str], before: list[dict]):
            """The turn answered through the vision service, or None where the chat model answers it."""
            if not needs_vision_model(vision, before, files, data[pipeline]):
                return None
            answering = metered_vision(vision, rate_limit, request)
            return visual_turn(
                answering, limits, text, files, before, values_of(data), data[pipeline], data[colour]
            )

        @on_gpu
        def on_chat(data, request: gr.Request = None):
            value = data[message] or {}
            text, files = value.get("text") or "", list(value.get("files") or [])
            history = path(data[tree])
            turns = by_vision(data, request, text, files, history)
            if turns is None:
                answering = metered_chat(service, rate_limit, request)
                turns = chat_turn(answering, limits, text, history, values_of(data), data[colour])
            for box, *rest in remembered(turns, data[tree], len(history)):
                yield as_box(box, files) if isinstance(box, str) else box, *rest

        def branch_point(history: list[dict], index: int, after_user: int) -> int:
            """Where a retry (after_user=1) or an edit (0) of message `index` starts a new version."""
            start = last_user_index(history, index)
            return len(history) if start is None else start + after_user

        def again(data, index: int, request, new_text: str | None = None):
            """A retried or edited turn, answered by the model on_chat would pick for it."""
            answering = metered_chat(service, rate_limit, request)
            history = path(data[tree])
            visual = partial(by_vision, data, request)
            return regenerate(
                answering, limits, history, index, values_of(data), data[colour], new_text, visual
            )

        @on_gpu
        def on_retry(data, event: gr.RetryData, request: gr.Request = None):
            turns = again(data, event.index, request)
            yield from remembered(turns, data[tree], branch_point(path(data[tree]), event.index, 1))

        @on_gpu
        def on_edit(data, event: gr.EditData, request: gr.Request = None):
            # The edit box shows the message as stored, escaped.
            turns = again(data, event.index, request, new_text=as_typed(event.value))
            yield from remembered(turns, data[tree], branch_point(path(data[tree]), event.index, 0))

        def on_undo(current, event: gr.UndoData):
            text, kept = undo(path(current), event.index)
            undone = grow(current, len(kept), kept)  # what was undone stays, as another version
            return {"text": text, "files": []}, kept, undone, *bar_values(undone)

        @on_gpu
        def on_complete(data, request: gr.Request = None):
            yield from complete_text(
                metered_chat(service, rate_limit, request), limits, data[text], values_of(data)
            )

        def on_export(data):
            file = export_chat(path(data[tree]), values_of(data), holder.loaded_name, limits, data[tree])
            return gr.File(value=file, visible=True)

        def on_import(file):
            imported, *rest = import_chat_tree(file, limits, list(controls))
            if not (isinstance(imported, dict) and "nodes" in imported):  # a refused file: nothing changes
                return [imported, *rest, *[gr.skip()] * len(version_bar.outputs)]
            return [imported, *rest, *bar_values(imported)]

        chat_inputs = {message, chatbot, tree, colour, pipeline} | control_inputs
        chat_outputs = [message, chatbot, token_view, tree, *version_bar.outputs]
        chat_events = [
            message.submit(on_chat, chat_inputs, chat_outputs, **generation),
            send.click(on_chat, chat_inputs, chat_outputs, **generation),
            chatbot.retry(on_retry, chat_inputs, chat_outputs, **generation),
            chatbot.edit(on_edit, chat_inputs, chat_outputs, **generation),
        ]
        stop.click(bar_values, tree, version_bar.outputs, cancels=chat_events, **private)
        chatbot.undo(on_undo, tree, [message, chatbot, tree, *version_bar.outputs], **private)
        clear.click(
            lambda: ([], EMPTY_BOX, "", empty_tree(), *bar_values(empty_tree())),
            None,
            [chatbot, message, token_view, tree, *version_bar.outputs],
            **private,
        )
        # The Chatbot's own bin empties it in the browser: the tree goes with it.
        chatbot.clear(
            lambda: (empty_tree(), *bar_values(empty_tree())), None, [tree, *version_bar.outputs], **private
        )
        wire_versions(version_bar, chatbot, tree, token_view)
        export_button.click(on_export, chat_inputs, exported, **private)
        import_button.upload(
            on_import, import_button, [tree, chatbot, *controls.values(), *version_bar.outputs], **private
        )
        completion = generate.click(
            on_complete, {text} | control_inputs, [text, completion_stats], **generation
        )
        stop_completion.click(None, None, None, cancels=[completion])

        demo.load(None, None, None, js=ENTER_GUARD_JS, **private)
        timer = gr.Timer(1.0, active=loading())

        def refresh_banner():
            return banner_markdown(models), gr.Timer(active=loading())

        timer.tick(refresh_banner, None, [banner_box, timer], queue=False, **private)
        demo.load(refresh_banner, None, [banner_box, timer], queue=False, **private)
        for switch in switches:  # the banner follows a model switch as it follows the first load
            switch.then(refresh_banner, None, [banner_box, timer], queue=False, **private)
        if caption_tab is not None:
            wire_caption(vision, limits, caption_tab, controls, generation, rate_limit)
        wire_inspector(service, limits, inspector, controls, chatbot)
        wire_compare(service, limits, compare_tab, controls, chatbot, generation, rate_limit)
        wire_presets(demo, presets, controls, message, limits)
        register_api(service, vision, limits, concurrency, rate_limit)
    return demo
