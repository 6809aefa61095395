"""The Blocks layout: banner, the tabs, the shared settings panel, and the events between them."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr

from backend.settings import ServerLimits
from ui.api import register_api
from ui.banner import banner_markdown
from ui.controls import build_controls
from ui.conversation_files import export_chat, import_chat
from ui.handlers import chat_turn, complete_text, regenerate, undo
from ui.inspector_tab import build_inspector_tab, wire_inspector
from ui.system_tab import build_system_tab

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CSS = (ASSETS / "style.css").read_text()
EXAMPLE_PROMPTS = json.loads((ASSETS / "example_prompts.json").read_text())
TITLE = "Chat & caption playground"


def build_ui(service, limits: ServerLimits, concurrency: int) -> gr.Blocks:
    """`service` is a backend.chat_service.ChatService (duck-typed: ui/ never imports torch)."""
    holder = service.holder

    def banner():
        return banner_markdown(holder.status(), holder.loaded_name, holder.is_demo)

    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}")
        banner_box = gr.Markdown(banner(), elem_id="banner")
        with gr.Row():
            with gr.Column(scale=3), gr.Tabs():
                with gr.Tab("Chat", id="chat"):
                    chatbot = gr.Chatbot(elem_id="chatbot", label="Conversation", height=520, editable="user")
                    message = gr.Textbox(
                        elem_id="message",
                        placeholder="Type a message and press Enter",
                        show_label=False,
                        lines=2,
                        max_lines=10,
                    )
                    with gr.Row():
                        send = gr.Button("Send", variant="primary", elem_id="send")
                        stop = gr.Button("Stop", variant="stop", elem_id="stop")
                        clear = gr.Button("Clear", elem_id="clear")
                    gr.Examples([[prompt] for prompt in EXAMPLE_PROMPTS], inputs=[message], label="Try")
                    colour = gr.Checkbox(
                        False, label="Colour the last reply by token probability", elem_id="colour"
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
                inspector = build_inspector_tab()
                build_system_tab(demo, service)
            with gr.Column(scale=1, min_width=280), gr.Accordion("Generation settings", open=True):
                controls = build_controls(limits)

        control_inputs = set(controls.values())
        generation = {
            "concurrency_limit": concurrency,
            "concurrency_id": "generation",
            "api_visibility": "private",
        }
        private = {"api_visibility": "private"}

        def values_of(data) -> dict:
            return {name: data[component] for name, component in controls.items()}

        def on_chat(data):
            yield from chat_turn(service, limits, data[message], data[chatbot], values_of(data), data[colour])

        def on_retry(data, event: gr.RetryData):
            yield from regenerate(service, limits, data[chatbot], event.index, values_of(data), data[colour])

        def on_edit(data, event: gr.EditData):
            yield from regenerate(
                service,
                limits,
                data[chatbot],
                event.index,
                values_of(data),
                data[colour],
                new_text=event.value,
            )

        def on_undo(history, event: gr.UndoData):
            return undo(history, event.index)

        def on_complete(data):
            yield from complete_text(service, limits, data[text], values_of(data))

        def on_export(data):
            path = export_chat(data[chatbot], values_of(data), holder.loaded_name, limits)
            return gr.File(value=path, visible=True)

        chat_inputs = {message, chatbot, colour} | control_inputs
        chat_outputs = [message, chatbot, token_view]
        chat_events = [
            message.submit(on_chat, chat_inputs, chat_outputs, **generation),
            send.click(on_chat, chat_inputs, chat_outputs, **generation),
            chatbot.retry(on_retry, chat_inputs, chat_outputs, **generation),
            chatbot.edit(on_edit, chat_inputs, chat_outputs, **generation),
        ]
        stop.click(None, None, None, cancels=chat_events)
        chatbot.undo(on_undo, chatbot, [message, chatbot], **private)
        clear.click(lambda: ([], "", ""), None, [chatbot, message, token_view], **private)
        export_button.click(on_export, chat_inputs, exported, **private)
        import_button.upload(
            lambda path: import_chat(path, limits, list(controls)),
            import_button,
            [chatbot, *controls.values()],
            **private,
        )
        completion = generate.click(
            on_complete, {text} | control_inputs, [text, completion_stats], **generation
        )
        stop_completion.click(None, None, None, cancels=[completion])

        timer = gr.Timer(1.0, active=holder.status().state == "loading")

        def refresh_banner():
            return banner(), gr.Timer(active=holder.status().state == "loading")

        timer.tick(refresh_banner, None, [banner_box, timer], queue=False, **private)
        demo.load(refresh_banner, None, [banner_box, timer], queue=False, **private)
        wire_inspector(service, limits, inspector, controls, chatbot)
        register_api(service, limits, concurrency)
    return demo
