"""A conversation with its alternatives: a tree of chat messages whose chosen path is what the Chatbot shows.

Pure functions on plain, JSON-able dicts (a gr.State holds the tree), no Gradio import. Each node holds a
run of Chatbot messages; a node's children continue it in different ways (a retried reply, an edited
message) and `chosen` says which one the path follows (None: the path ends there, as after Undo).
Functions never change a tree they are given: they return a new one that shares the untouched nodes.
"""

from __future__ import annotations

from typing import Any

from ui.chat_text import as_typed
from ui.messages import image_paths, is_note, text_of

ROOT = 0


def empty_tree() -> dict:
    return linear_tree([])


def linear_tree(messages: list[dict]) -> dict:
    """A tree with one branch: `messages` after the (empty) root."""
    root = {"parent": None, "messages": [], "children": [], "chosen": None}
    tree = {"nodes": [root], "focus": None}
    return branch(tree, 0, list(messages)) if messages else tree


def path_nodes(tree: dict) -> list[int]:
    """The ids of the nodes the path goes through, root first."""
    nodes, ids = tree["nodes"], [ROOT]
    while (chosen := nodes[ids[-1]]["chosen"]) is not None:
        ids.append(nodes[ids[-1]]["children"][chosen])
    return ids


def path(tree: dict) -> list[dict]:
    """The chosen conversation, as the Chatbot shows it."""
    return [message for node in path_nodes(tree) for message in tree["nodes"][node]["messages"]]


def key(message: dict) -> tuple:
    """What makes two messages the same, whatever shape Gradio gave their content in."""
    title = (message.get("metadata") or {}).get("title")
    content = message.get("content")
    return message.get("role"), text_of(content), title, len(image_paths(content))


def common_prefix(first: list[dict], second: list[dict]) -> int:
    count = 0
    for a, b in zip(first, second, strict=False):
        if key(a) != key(b):
            break
        count += 1
    return count


def grow(tree: dict, at: int, history: list[dict]) -> dict:
    """The tree after a handler turned the path into `history`, keeping the old path from `at` on as a branch.

    `at` is where the handler meant to start (a retry: after the user message; an edit: at it; a new
    message: at the end). A handler that gave back less (a refusal) branches where `history` first differs.
    """
    shown = path(tree)
    start = min(at, common_prefix(shown, history), len(shown))
    tail = list(history[start:])
    if not tail and start == len(shown):
        return tree
    grown = branch(tree, start, tail) if tail else end_at(tree, start)
    return {**grown, "focus": None}


def locate(tree: dict, index: int) -> tuple[int, int]:
    """(node id, offset in its messages) of the path's message `index`; the path's end is (last node, len)."""
    ids = path_nodes(tree)
    for node in ids:
        count = len(tree["nodes"][node]["messages"])
        if index < count:
            return node, index
        index -= count
    last = ids[-1]
    return last, len(tree["nodes"][last]["messages"])


def split(tree: dict, index: int) -> tuple[dict, int]:
    """The tree with a node boundary before path message `index`, and the id of the node that ends there."""
    node, offset = locate(tree, index)
    nodes = list(tree["nodes"])
    if offset == 0 and node != ROOT:
        return tree, nodes[node]["parent"]
    old = nodes[node]
    if offset == len(old["messages"]):
        return tree, node
    tail_id = len(nodes)
    nodes.append({**old, "parent": node, "messages": old["messages"][offset:]})
    for child in old["children"]:
        nodes[child] = {**nodes[child], "parent": tail_id}
    nodes[node] = {**old, "messages": old["messages"][:offset], "children": [tail_id], "chosen": 0}
    return {**tree, "nodes": nodes}, node


def branch(tree: dict, index: int, messages: list[dict]) -> dict:
    """A new branch holding `messages` from path message `index` on, chosen; the old one stays a sibling."""
    tree, parent = split(tree, index)
    nodes = list(tree["nodes"])
    new_id = len(nodes)
    nodes.append({"parent": parent, "messages": list(messages), "children": [], "chosen": None})
    children = nodes[parent]["children"] + [new_id]
    nodes[parent] = {**nodes[parent], "children": children, "chosen": len(children) - 1}
    return {**tree, "nodes": nodes}


def end_at(tree: dict, index: int) -> dict:
    """The path stops before message `index`; what followed stays in the tree as a branch."""
    tree, parent = split(tree, index)
    nodes = list(tree["nodes"])
    nodes[parent] = {**nodes[parent], "chosen": None}
    return {**tree, "nodes": nodes}


def versions(tree: dict, index: int | None) -> tuple[int, int] | None:
    """(which, of how many) versions path message `index` has; None when it has no other version."""
    if index is None or not 0 <= index < len(path(tree)):
        return None
    node, offset = locate(tree, index)
    parent = tree["nodes"][node]["parent"]
    if offset != 0 or parent is None:
        return None
    siblings = tree["nodes"][parent]["children"]
    return (siblings.index(node) + 1, len(siblings)) if len(siblings) > 1 else None


def step_start(history: list[dict], index: int) -> int:
    """The message a click on `index` means: a note (numbers, notices) belongs to the message before it."""
    while index > 0 and is_note(history[index]):
        index -= 1
    return index


def target(tree: dict) -> int | None:
    """The message the version buttons act on: the one picked, else the newest that has other versions."""
    focus = tree.get("focus")
    if focus is not None and focus < len(path(tree)):
        return focus
    newest, start, nodes = None, 0, tree["nodes"]
    for node in path_nodes(tree):
        parent = nodes[node]["parent"]
        if parent is not None and len(nodes[parent]["children"]) > 1 and nodes[node]["messages"]:
            newest = start
        start += len(nodes[node]["messages"])
    return newest


def focused(tree: dict, index: int | None) -> dict:
    return {**tree, "focus": index}


def switch(tree: dict, index: int, step: int) -> dict:
    """Show the previous (step -1) or next (+1) version of path message `index`; stops at either end."""
    which = versions(tree, index)
    if which is None:
        return tree
    node, _ = locate(tree, index)
    parent = tree["nodes"][node]["parent"]
    nodes = list(tree["nodes"])
    chosen = min(max(which[0] - 1 + step, 0), which[1] - 1)
    nodes[parent] = {**nodes[parent], "chosen": chosen}
    return {**tree, "nodes": nodes, "focus": index}


def has_branches(tree: dict) -> bool:
    return any(len(node["children"]) > 1 for node in tree["nodes"])


def describe(message: dict[str, Any], limit: int = 40) -> str:
    """A short name for a message in the version bar: whose it is and how it starts."""
    text = " ".join(as_typed(text_of(message.get("content"))).split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    whose = "your message" if message.get("role") == "user" else "the reply"
    return f"{whose} “{text}”" if text else whose
