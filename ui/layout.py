"""The Blocks layout: banner, Chat and Completion tabs, the shared controls panel, and events."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from backend.settings import ServerLimits
from ui.api import register_api
from ui.banner import banner_markdown
from ui.controls import build_controls
from ui.handlers import chat_turn, complete_text
from ui.inspector_tab import build_inspector_tab, wire_inspector

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CSS = (ASSETS / "style.css").read_text()
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
            with gr.Column(scale=3):
                with gr.Tab("Chat", id="chat"):
                    chatbot = gr.Chatbot(elem_id="chatbot", label="Conversation", height=520)
                    message = gr.Textbox(
                        elem_id="message",
                        placeholder="Type a message and press Enter",
                        show_label=False,
                        lines=2,
                        max_lines=10,
                        submit_btn=False,
                    )
                    with gr.Row():
                        send = gr.Button("Send", variant="primary", elem_id="send")
                        stop = gr.Button("Stop", variant="stop", elem_id="stop")
                        clear = gr.Button("Clear", elem_id="clear")
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
            with gr.Column(scale=1, min_width=280), gr.Accordion("Generation settings", open=True):
                controls = build_controls(limits)

        control_inputs = set(controls.values())

        def values_of(data) -> dict:
            return {name: data[component] for name, component in controls.items()}

        def on_chat(data):
            yield from chat_turn(service, limits, data[message], data[chatbot], values_of(data))

        def on_complete(data):
            yield from complete_text(service, limits, data[text], values_of(data))

        chat_events = [
            trigger(
                on_chat,
                {message, chatbot} | control_inputs,
                [message, chatbot],
                concurrency_limit=concurrency,
                concurrency_id="generation",
                api_visibility="private",
            )
            for trigger in (message.submit, send.click)
        ]
        stop.click(None, None, None, cancels=chat_events)
        clear.click(lambda: ([], ""), None, [chatbot, message], api_visibility="private")
        completion = generate.click(
            on_complete,
            {text} | control_inputs,
            [text, completion_stats],
            concurrency_limit=concurrency,
            concurrency_id="generation",
            api_visibility="private",
        )
        stop_completion.click(None, None, None, cancels=[completion])

        timer = gr.Timer(1.0, active=holder.status().state == "loading")

        def refresh_banner():
            return banner(), gr.Timer(active=holder.status().state == "loading")

        timer.tick(refresh_banner, None, [banner_box, timer], api_visibility="private", queue=False)
        demo.load(refresh_banner, None, [banner_box, timer], api_visibility="private", queue=False)
        wire_inspector(service, limits, inspector, controls, chatbot)
        register_api(service, limits, concurrency)
    return demo
