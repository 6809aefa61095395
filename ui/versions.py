"""The version bar under the chat: ◀ 2/3 ▶ through the versions of one message, and the tree behind it.

Gradio's Chatbot draws `options` under the last message only and has no per-message control of ours, so
the bar sits under the chat and acts on one message: the one last clicked in the chat, else the newest
message that has other versions (a retried reply, an edited message).
"""

from __future__ import annotations

import html
from collections.abc import Iterator
from dataclasses import dataclass

import gradio as gr

from ui.branches import describe, focused, grow, has_branches, path, step_start, switch, target, versions

HINT = "Click a message in the chat to see its versions."


@dataclass(frozen=True)
class VersionBar:
    row: gr.Row
    previous: gr.Button
    count: gr.HTML
    next: gr.Button
    about: gr.HTML

    @property
    def outputs(self) -> list:
        return [self.row, self.previous, self.count, self.next, self.about]


def build_version_bar() -> VersionBar:
    """Call where the bar goes; hidden until the conversation has a second version of something."""
    with gr.Row(visible=False, elem_id="versions", equal_height=True) as row:
        previous = gr.Button("◀", size="sm", elem_id="version-previous", min_width=44, scale=0)
        count = gr.HTML("", elem_id="version-count", container=False)
        after = gr.Button("▶", size="sm", elem_id="version-next", min_width=44, scale=0)
        about = gr.HTML("", elem_id="version-about", container=False)
    return VersionBar(row, previous, count, after, about)


def bar_values(tree: dict, busy: bool = False) -> list:
    """What the bar shows for `tree`, in VersionBar.outputs order; `busy` while a reply streams in (a
    switch then would be undone by the next streamed update), ◀ and ▶ are off."""
    index = target(tree)
    which = versions(tree, index)
    visible = gr.Row(visible=has_branches(tree))
    off = gr.Button(interactive=False)
    if which is None:
        about = f"{describe(path(tree)[index])} has one version. {HINT}" if index is not None else HINT
        return [visible, off, "1/1", off, html.escape(about[:1].upper() + about[1:])]
    position, count = which
    if busy:
        return [visible, off, f"{position}/{count}", off, "Writing the reply…"]
    about = f"Versions of {describe(path(tree)[index])}. {HINT}"
    return [
        visible,
        gr.Button(interactive=position > 1),
        f"{position}/{count}",
        gr.Button(interactive=position < count),
        html.escape(about),
    ]


def remembered(turns: Iterator[tuple], base: dict, at: int) -> Iterator[tuple]:
    """A chat handler's (box, history, view) updates, each with the tree that keeps what it replaced from
    `at` on as another version, and the bar: ◀ ▶ off until the handler is done (Stop refreshes it too)."""
    tree = None
    for box, history, view in turns:
        tree = grow(base, at, history)
        yield box, history, view, tree, *bar_values(tree, busy=True)
    if tree is not None:  # done: ◀ ▶ on again. Only the buttons: the chat may have been cleared since.
        row, previous, count, after, about = bar_values(tree)
        keep = gr.skip()
        yield keep, keep, keep, keep, keep, previous, keep, after, about


def wire_versions(bar: VersionBar, chatbot: gr.Chatbot, tree: gr.State, token_view: gr.HTML) -> None:
    """Clicking a message picks it; ◀ and ▶ show its other versions in the chat."""
    private = {"api_visibility": "private", "queue": False}

    def on_select(current: dict, event: gr.SelectData):
        picked = focused(current, step_start(path(current), event.index))
        return picked, *bar_values(picked)

    def on_switch(current: dict, step: int):
        index = target(current)
        if index is None:
            return gr.skip(), current, gr.skip(), *bar_values(current)
        switched = switch(current, index, step)
        return path(switched), switched, "", *bar_values(switched)

    chatbot.select(on_select, tree, [tree, *bar.outputs], **private)
    outputs = [chatbot, tree, token_view, *bar.outputs]
    bar.previous.click(lambda current: on_switch(current, -1), tree, outputs, **private)
    bar.next.click(lambda current: on_switch(current, +1), tree, outputs, **private)
