"""The Compare tab: one prompt answered with two sets of settings at once, in two columns.

Both requests go to the same (metered) chat service, so the batching engine decodes them side by side;
one generator reads the two reply streams in turn and Stop closes both.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from backend.settings import MAX_SEED, ServerLimits, request_settings
from backend.zero_gpu import on_gpu
from ui.controls import build_controls
from ui.handlers import BEAM_NOTE, failure_message, metered_chat, report
from ui.messages import history_to_turns
from ui.settings_text import compare_headers

SIDES = ("A", "B")
WAITING_HEADS = ("<p><b>A</b> · the settings panel</p>", "<p><b>B</b> · settings B below</p>")


@dataclass(frozen=True)
class CompareTab:
    tab: gr.Tab
    prompt: gr.Textbox
    with_chat: gr.Checkbox
    run: gr.Button
    stop: gr.Button
    copy: gr.Button
    controls_b: dict
    heads: tuple[gr.HTML, gr.HTML]
    replies: tuple[gr.Textbox, gr.Textbox]
    stats: tuple[gr.Markdown, gr.Markdown]

    @property
    def outputs(self) -> list:
        return [*self.heads, *self.replies, *self.stats]


def build_compare_tab(limits: ServerLimits, unsupported=None, adapters=()) -> CompareTab:
    """Call where the tab goes; wire it with `wire_compare` once the settings panel (A) exists."""
    with gr.Tab("Compare", id="compare") as tab:
        gr.Markdown(
            "One prompt, two sets of settings, answered at the same time. **A** uses the settings panel, "
            "**B** the settings below; what differs is marked."
        )
        prompt = gr.Textbox(
            label="Prompt",
            elem_id="compare-prompt",
            lines=1,  # Enter runs both, Shift+Enter adds a line
            max_lines=8,
            placeholder="Enter runs both, Shift+Enter adds a line",
            html_attributes=gr.InputHTMLAttributes(enterkeyhint="send"),
        )
        with gr.Row():
            with_chat = gr.Checkbox(
                False,
                label="Continue the chat (the conversation so far comes first)",
                elem_id="compare-with-chat",
            )
            run = gr.Button("Compare", variant="primary", elem_id="compare-run", min_width=80)
            stop = gr.Button("Stop", variant="stop", elem_id="compare-stop", min_width=80)
        heads, replies, stats = [], [], []
        with gr.Row(equal_height=False):
            for side, waiting in zip(SIDES, WAITING_HEADS, strict=True):
                with gr.Column(min_width=240):
                    low = side.lower()
                    heads.append(gr.HTML(waiting, elem_id=f"compare-head-{low}", elem_classes="compare-head"))
                    reply = gr.Textbox(
                        label=f"Reply {side}", lines=8, interactive=False, elem_id=f"compare-reply-{low}"
                    )
                    replies.append(reply)
                    stats.append(gr.Markdown(elem_id=f"compare-stats-{low}", elem_classes="stats"))
        with gr.Accordion("Settings B", open=False, elem_id="compare-settings-b"):
            copy = gr.Button("Copy A into B, with the next seed", size="sm", elem_id="compare-copy")
            controls_b = build_controls(limits, unsupported, adapters, elem_prefix="compare-b-")
    return CompareTab(
        tab, prompt, with_chat, run, stop, copy, controls_b, tuple(heads), tuple(replies), tuple(stats)
    )


def next_seed(seed: Any) -> Any:
    """B's seed after a copy: the one after A's; -1 (draw one) stays -1, and each side draws its own."""
    if isinstance(seed, (int, float)) and not isinstance(seed, bool) and seed >= 0:
        return (int(seed) + 1) % (MAX_SEED + 1)
    return seed


def copied_values(values_a: dict[str, Any]) -> dict[str, Any]:
    return {**values_a, "seed": next_seed(values_a.get("seed"))}


def interleaved(streams: list) -> Iterator[tuple[int, Any, Exception | None]]:
    """(stream index, reply, None) in turn from each stream, (index, None, None) when one ends, and
    (index, None, error) when one fails; the others carry on. As /v1's Interleaved, one row per request."""
    active, turn = list(range(len(streams))), 0
    while active:
        slot = turn % len(active)
        index = active[slot]
        try:
            reply = next(streams[index])
        except StopIteration:
            active.pop(slot)
            yield index, None, None
            continue
        except Exception as error:
            active.pop(slot)
            yield index, None, error
            continue
        turn = slot + 1
        yield index, reply, None


def close_all(streams: list) -> None:
    for stream in streams:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def compare_replies(
    service, limits: ServerLimits, prompt: str, history: list[dict], values: tuple[dict, dict]
) -> Iterator[list[str]]:
    """Yield [head A, head B, reply A, reply B, stats A, stats B] as both replies stream in."""
    streams: list = []
    try:
        settings = [request_settings(side, limits) for side in values]  # both checked before either starts
        turns = history_to_turns(history)
        for side in settings:
            streams.append(service.chat(prompt, turns, side))
    except Exception as error:  # nothing shown yet: the prompt stays to be fixed
        close_all(streams)
        report(error)
        message = f"⚠️ {failure_message(error)}"
        yield [*WAITING_HEADS, "", "", message, message]
        return
    heads = list(compare_headers(*settings))
    texts = ["", ""]
    stats = ["⏳ " + (BEAM_NOTE if side.mode == "beam" else "Generating…") for side in settings]
    last: list = [None, None]
    yield heads + texts + stats
    try:
        for index, reply, error in interleaved(streams):
            if error is not None:
                report(error)
                stats[index] = f"⚠️ {failure_message(error)}"
            elif reply is None:  # this side is done
                stats[index] = finished_line(last[index])
            elif reply.queue_position:
                stats[index] = f"⏳ Waiting for a free slot: number {reply.queue_position} in line"
            else:
                last[index], texts[index] = reply, reply.text
            yield heads + texts + stats
    finally:  # Stop closes this generator: both requests end with it
        close_all(streams)


def finished_line(reply) -> str:
    if reply is None:
        return "No reply."
    return reply.stats_line() + (f" · ℹ️ {reply.notice}" if reply.notice else "")


def wire_compare(
    service, limits: ServerLimits, tab: CompareTab, controls: dict, chatbot, generation: dict, rate_limit=None
) -> None:
    """Controls A are the settings panel; `generation` the chat's concurrency settings (one queue)."""
    controls_a, controls_b = controls, tab.controls_b
    private = {"api_visibility": "private"}

    @on_gpu
    def on_compare(data, request: gr.Request = None):
        values = tuple({name: data[c] for name, c in side.items()} for side in (controls_a, controls_b))
        history = data[chatbot] if data[tab.with_chat] else []
        yield from compare_replies(
            metered_chat(service, rate_limit, request), limits, data[tab.prompt] or "", history, values
        )

    inputs = {tab.prompt, tab.with_chat, chatbot} | set(controls_a.values()) | set(controls_b.values())
    runs = [
        tab.prompt.submit(on_compare, inputs, tab.outputs, **generation),
        tab.run.click(on_compare, inputs, tab.outputs, **generation),
    ]
    tab.stop.click(None, None, None, cancels=runs)

    def copy_a(data) -> list:
        values = copied_values({name: data[c] for name, c in controls_a.items()})
        return [values[name] for name in controls_b]

    tab.copy.click(copy_a, set(controls_a.values()), list(controls_b.values()), **private)
    copied = gr.State(False)  # B starts as a copy of A the first time the tab opens

    def first_open(data) -> list:
        if data[copied]:
            return [gr.skip()] * (1 + len(controls_b))
        return [True, *copy_a(data)]

    tab.tab.select(first_open, {copied} | set(controls_a.values()), [copied, *controls_b.values()], **private)
