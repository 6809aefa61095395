"""Export the chat (with its settings and every version of it) to a JSON file and import it back."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import gradio as gr

from backend.conversation_io import Conversation, export_conversation, read_conversation
from backend.errors import UserError
from backend.settings import GenerationSettings, ServerLimits
from ui.branches import ROOT, linear_tree, path
from ui.chat_text import as_typed, shown
from ui.controls import control_values, page_defaults
from ui.handlers import report
from ui.messages import image_paths, is_note, note, text_of


def plain_message(message: dict) -> dict[str, str] | None:
    """A message as typed and generated, no display escaping; notes keep their title. None: nothing to
    keep (an image, whose file stays on this server)."""
    content = as_typed(text_of(message.get("content")))
    if is_note(message):
        return {"role": "assistant", "content": content, "title": message["metadata"]["title"]}
    image_only = not content and image_paths(message.get("content"))
    if message.get("role") not in ("user", "assistant") or image_only:
        return None
    return {"role": message["role"], "content": content}


def plain_messages(history: list[dict]) -> list[dict[str, str]]:
    return [plain for message in history or [] if (plain := plain_message(message)) is not None]


def file_nodes(tree: dict) -> list[dict]:
    """The tree's nodes as the file lists them: numbered root first, each parent before its children."""
    order, stack = [], [ROOT]
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(reversed(tree["nodes"][node]["children"]))
    number = {node: index for index, node in enumerate(order)}
    nodes = [tree["nodes"][node] for node in order]
    return [
        {
            "parent": None if node["parent"] is None else number[node["parent"]],
            "messages": plain_messages(node["messages"]),
            "chosen": node["chosen"],
        }
        for node in nodes
    ]


def chat_message(plain: dict[str, str]) -> dict:
    if "title" in plain:
        return note(plain["title"], shown(plain["content"]))
    return {"role": plain["role"], "content": shown(plain["content"])}


def tree_of(conversation: Conversation) -> dict:
    """The UI's tree (see ui.branches) from an imported file's nodes."""
    nodes = [
        {"parent": node["parent"], "messages": [chat_message(m) for m in node["messages"]], "children": []}
        for node in conversation.nodes
    ]
    for index, node in enumerate(nodes[1:], start=1):
        nodes[node["parent"]]["children"].append(index)
    for node, source in zip(nodes, conversation.nodes, strict=True):
        node["chosen"] = source["chosen"]
    return {"nodes": nodes, "focus": None}


def export_chat(
    history: list[dict], values: dict, model: str, limits: ServerLimits, tree: dict | None = None
) -> str:
    """Write the export to a fresh temporary file and return its path for download.

    `tree`: the conversation with its versions (ui.branches); without it, `history` is the one branch.
    """
    try:
        settings = GenerationSettings.from_inputs(values, limits).to_dict()
    except UserError:
        settings = page_defaults(limits).to_dict()  # the chat matters more than an unfinished slider value
    tree = tree if tree is not None else linear_tree(list(history or []))
    data = export_conversation(plain_messages(path(tree)), settings, model, file_nodes(tree))
    folder = Path(tempfile.mkdtemp(prefix="playground-export-"))
    file = folder / f"conversation-{time.strftime('%Y%m%d-%H%M%S')}.json"
    file.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    return str(file)


def import_chat(path_: str | None, limits: ServerLimits, control_names: list[str]) -> list:
    """[history, *control values]; on a bad file, a warning and every output left as it was."""
    return import_chat_tree(path_, limits, control_names)[1:]


def import_chat_tree(path_: str | None, limits: ServerLimits, control_names: list[str]) -> list:
    """[tree, history, *control values], or a warning and every output left as it was."""
    unchanged = [gr.update()] * (2 + len(control_names))
    if not path_:
        return unchanged
    try:
        conversation = read_conversation(Path(path_).read_bytes(), limits)
    except (UserError, OSError) as error:
        report(error if isinstance(error, UserError) else UserError(f"Could not read the file: {error}"))
        return unchanged
    tree = tree_of(conversation)
    values = control_values(conversation.settings)
    return [tree, path(tree)] + [values[name] for name in control_names]
