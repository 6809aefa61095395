"""Conversations as JSON files: export with their settings, import with every field checked.

Version 2 (written now) adds `branches`: every version of the conversation, retried replies and edited
messages, as a list of nodes; `messages` stays the chosen path, so a reader of `messages` alone sees what
the chat showed. A message may carry a `title`: then it is a note (a reply's numbers line, a notice), shown
but never sent to the model. Version 1 files (one branch, no notes) still import.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from backend.errors import BadInput, InvalidSettings
from backend.settings import GenerationSettings, ServerLimits

FORMAT = "chat-caption-playground/conversation"
VERSION = 2
READABLE_VERSIONS = (1, 2)
MAX_FILE_BYTES = 2 * 2**20
MAX_MESSAGES = 1000  # in all branches together
MAX_TITLE_CHARS = 2000
ROLES = ("user", "assistant")


@dataclass(frozen=True)
class Conversation:
    """An imported file. `nodes`: {"parent", "messages", "chosen"} with each parent before its children;
    node 0 is the root, and `chosen` indexes a node's children in file order (None: the path ends there)."""

    messages: list[dict[str, str]]
    settings: GenerationSettings
    nodes: list[dict[str, Any]]


def export_conversation(
    messages: list[dict[str, str]], settings: dict[str, Any], model: str, nodes: list[dict] | None = None
) -> dict:
    """`messages` are {"role", "content"[, "title"]} with plain text, the chosen path; `settings` as
    GenerationSettings.to_dict(); `nodes` the branches as Conversation.nodes has them, or None for one."""
    data = {
        "format": FORMAT,
        "version": VERSION,
        "model": model,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": settings,
        "messages": messages,
    }
    if nodes is not None:
        data["branches"] = {"nodes": nodes}
    return data


def read_exported(raw: bytes, max_bytes: int, marker: str, kinds: str, kind: str) -> dict:
    """A file this playground exported (a conversation, presets) as JSON: its size, encoding and
    format marker checked, BadInput naming what is wrong. `kinds`/`kind` name it in messages."""
    if len(raw) > max_bytes:
        raise BadInput(f"The file is {len(raw):,} bytes; {kinds} up to {max_bytes:,} bytes import.")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise BadInput(f"The file is not valid JSON ({error}).") from None
    if not isinstance(data, dict) or data.get("format") != marker:
        raise BadInput(f"This is not {kind} exported from this playground (no 'format' marker).")
    return data


def parse_conversation(raw: bytes, limits: ServerLimits) -> tuple[list[dict[str, str]], GenerationSettings]:
    """Messages (the chosen path) and settings from an exported file; BadInput says what is wrong with it."""
    conversation = read_conversation(raw, limits)
    return conversation.messages, conversation.settings


def read_conversation(raw: bytes, limits: ServerLimits) -> Conversation:
    """The whole file, branches included; a file without branches is one branch."""
    data = read_exported(raw, MAX_FILE_BYTES, FORMAT, "conversations", "a conversation")
    version = data.get("version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise BadInput(
            f"Conversation version {version!r} is not supported; this playground reads versions 1 and 2."
        )
    messages = data.get("messages")
    if not isinstance(messages, list) or len(messages) > MAX_MESSAGES:
        raise BadInput(f"'messages' must be a list of at most {MAX_MESSAGES} messages.")
    checked = [check_message(index, message, limits) for index, message in enumerate(messages)]
    settings_data = data.get("settings", {})
    if not isinstance(settings_data, dict):
        raise BadInput("'settings' must be an object.")
    try:
        settings = GenerationSettings.from_inputs(settings_data, limits)
    except InvalidSettings as error:
        raise BadInput(f"The file's settings are invalid: {error}") from None
    branches = data.get("branches") if version >= 2 else None
    if branches is None:
        root = {"parent": None, "messages": [], "chosen": 0 if checked else None}
        nodes = [root] + ([{"parent": 0, "messages": checked, "chosen": None}] if checked else [])
        return Conversation(checked, settings, nodes)
    nodes = check_nodes(branches, limits)
    if chosen_path(nodes) != checked:
        raise BadInput("The file's 'messages' are not the path its branches choose.")
    return Conversation(checked, settings, nodes)


def check_nodes(branches: Any, limits: ServerLimits) -> list[dict[str, Any]]:
    """The branch nodes, each checked: a tree rooted at node 0, each parent listed before its children."""
    nodes = branches.get("nodes") if isinstance(branches, dict) else None
    if not isinstance(nodes, list) or not 1 <= len(nodes) <= MAX_MESSAGES:
        raise BadInput(f"'branches' must hold 'nodes', a list of 1 to {MAX_MESSAGES} nodes.")
    checked: list[dict[str, Any]] = []
    children = [0] * len(nodes)
    total = 0
    for index, node in enumerate(nodes):
        if not isinstance(node, dict):
            raise BadInput(f"Branch node {index} is not an object.")
        parent = node.get("parent")
        if index == 0 and parent is not None:
            raise BadInput("Branch node 0 is the start of the conversation: its 'parent' must be null.")
        if index > 0 and (isinstance(parent, bool) or not isinstance(parent, int) or not 0 <= parent < index):
            raise BadInput(f"Branch node {index} has parent {parent!r}; expected an earlier node's number.")
        if index > 0:
            children[parent] += 1
        messages = node.get("messages", [])
        if not isinstance(messages, list):
            raise BadInput(f"Branch node {index}: 'messages' must be a list.")
        total += len(messages)
        if total > MAX_MESSAGES:
            raise BadInput(f"The branches hold more than {MAX_MESSAGES} messages.")
        where = f"Branch node {index}, message"
        messages = [check_message(number, message, limits, where) for number, message in enumerate(messages)]
        checked.append({"parent": parent, "messages": messages, "chosen": node.get("chosen")})
    for index, node in enumerate(checked):
        chosen = node["chosen"]
        if chosen is not None and (
            isinstance(chosen, bool) or not isinstance(chosen, int) or not 0 <= chosen < children[index]
        ):
            raise BadInput(f"Branch node {index} chooses child {chosen!r}; it has {children[index]}.")
    return checked


def chosen_path(nodes: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The messages along the chosen children, from node 0."""
    children: list[list[int]] = [[] for _ in nodes]
    for index, node in enumerate(nodes[1:], start=1):
        children[node["parent"]].append(index)
    messages, current = list(nodes[0]["messages"]), 0
    while nodes[current]["chosen"] is not None:
        current = children[current][nodes[current]["chosen"]]
        messages += nodes[current]["messages"]
    return messages


def check_message(index: int, message: Any, limits: ServerLimits, where: str = "Message") -> dict[str, str]:
    if not isinstance(message, dict):
        raise BadInput(f"{where} {index + 1} is not an object.")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise BadInput(f"{where} {index + 1} has role {role!r}; expected one of {', '.join(ROLES)}.")
    if not isinstance(content, str):
        raise BadInput(f"{where} {index + 1} has no text content.")
    if len(content) > limits.max_input_chars * 4:
        raise BadInput(f"{where} {index + 1} is {len(content):,} characters, too long to import.")
    checked = {"role": role, "content": content}
    if "title" in message:
        title = message["title"]
        if not isinstance(title, str) or not title.strip() or len(title) > MAX_TITLE_CHARS:
            raise BadInput(f"{where} {index + 1}: 'title' must be text of 1 to {MAX_TITLE_CHARS} characters.")
        checked["title"] = title
    return checked
