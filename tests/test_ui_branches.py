"""The conversation tree behind Retry, Edit and Undo (ui.branches), and the numbers line of each version."""

from __future__ import annotations

import json
from pathlib import Path

from backend.settings import GenerationSettings, ServerLimits
from ui.branches import (
    empty_tree,
    focused,
    grow,
    has_branches,
    linear_tree,
    path,
    step_start,
    switch,
    target,
    versions,
)
from ui.conversation_files import export_chat, import_chat_tree
from ui.messages import note, text_of
from ui.presets import FIELDS
from ui.settings_text import compare_headers, settings_line


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


def texts(tree: dict) -> list[str]:
    """Each message's text; a note's title."""
    return [(m.get("metadata") or {}).get("title") or text_of(m["content"]) for m in path(tree)]


LIMITS = ServerLimits(max_new_tokens=64)
FIRST = [user("first"), bot("one"), note("seed 1")]
SECOND = [user("second"), bot("two"), note("seed 2")]


def chatted() -> dict:
    """Two exchanges, each sent as the chat handler does: appended at the end."""
    tree = grow(empty_tree(), 0, FIRST)
    return grow(tree, len(FIRST), FIRST + SECOND)


def test_sending_appends_and_makes_no_versions():
    tree = chatted()
    assert path(tree) == FIRST + SECOND
    assert not has_branches(tree)
    assert target(tree) is None
    assert all(versions(tree, index) is None for index in range(6))


def test_retry_keeps_the_old_reply_as_a_version_with_its_own_numbers_line():
    tree = chatted()
    retried = grow(tree, 4, FIRST + [user("second"), bot("two again"), note("seed 3")])
    assert texts(retried)[3:] == ["second", "two again", "seed 3"]
    assert versions(retried, 4) == (2, 2) and target(retried) == 4
    assert versions(retried, 3) is None  # the user message itself has one version
    back = switch(retried, 4, -1)
    assert path(back) == FIRST + SECOND  # the old reply, with its own numbers line
    assert versions(back, 4) == (1, 2)
    assert path(switch(back, 4, -1)) == path(back)  # it stops at the first
    assert path(switch(back, 4, +1)) == path(retried)
    assert path(tree) == FIRST + SECOND and not has_branches(tree)  # the tree it was given is unchanged


def test_an_edit_forks_and_the_old_branch_stays_whole():
    tree = grow(chatted(), 4, FIRST + [user("second"), bot("two again"), note("seed 3")])  # versions below
    edited = grow(tree, 0, [user("changed"), bot("new"), note("seed 4")])
    assert texts(edited) == ["changed", "new", "seed 4"]
    assert versions(edited, 0) == (2, 2) and target(edited) == 0
    old = switch(edited, 0, -1)
    assert texts(old)[:3] == ["first", "one", "seed 1"]
    assert texts(old)[3:] == ["second", "two again", "seed 3"]  # the old branch as it was left
    assert versions(old, 4) == (2, 2)  # its own versions still there
    assert target(focused(old, step_start(path(old), 5))) == 4  # a click on a numbers line means its reply


def test_a_refused_retry_branches_where_the_history_differs():
    tree = chatted()
    refusal = FIRST + [note("⚠️ Rate limit")]  # a refusal drops the user message: the box gets it back
    refused = grow(tree, 4, refusal)
    assert path(refused) == refusal
    assert versions(refused, 3) == (2, 2)
    assert path(switch(refused, 3, -1)) == FIRST + SECOND


def test_undo_ends_the_path_and_the_undone_turn_comes_back_as_a_version():
    tree = chatted()
    undone = grow(tree, 3, FIRST)
    assert path(undone) == FIRST and not has_branches(undone)
    resent = grow(undone, 3, FIRST + [user("second, better"), bot("three"), note("seed 5")])
    assert versions(resent, 3) == (2, 2)
    assert path(switch(resent, 3, -1)) == FIRST + SECOND


def test_messages_in_gradios_shape_match_the_ones_handlers_give():
    tree = linear_tree([{"role": "user", "content": [{"type": "text", "text": "first"}]}, bot("one")])
    assert grow(tree, 2, [user("first"), bot("one")]) is tree  # nothing new: the same tree


def test_numbers_line_says_the_settings_that_shaped_the_reply():
    assert settings_line(GenerationSettings()) == (
        "temperature 0.7 · top-k 50 · top-p 0.95 · repetition penalty 1.1 · max 256 tokens"
    )
    greedy = GenerationSettings(mode="greedy", stop_words=("END",), adapter="pirate")
    expected = "repetition penalty 1.1 · max 256 tokens · stops at “END” · adapter pirate"
    assert settings_line(greedy) == expected
    assert settings_line(GenerationSettings(mode="beam", num_beams=3)).startswith("3 beams")


def test_compare_heads_mark_only_what_differs():
    a = GenerationSettings(seed=5)
    b = GenerationSettings(seed=6, temperature=1.1, system_prompt="<b>Pirate</b>")
    head_a, head_b = compare_headers(a, b)
    for head in (head_a, head_b):
        marked = sorted(part.split('"')[1] for part in head.split("<mark data-setting=")[1:])
        assert marked == ["seed", "system_prompt", "temperature"]
        assert 'data-setting="top_k"' not in head and "top-k 50" in head
    assert "&lt;b&gt;Pirate&lt;/b&gt;" in head_b and "<b>Pirate" not in head_b
    greedy, beam = GenerationSettings(mode="greedy"), GenerationSettings(mode="beam")
    greedy_head, beam_head = compare_headers(greedy, beam)
    assert '<mark data-setting="mode">greedy</mark>' in greedy_head and "4 beams" in beam_head


def test_export_then_import_keeps_every_version(tmp_path):
    tree = grow(chatted(), 4, FIRST + [user("second"), bot("two again"), note("seed 3")])
    tree = grow(tree, 0, [{"role": "user", "content": {"path": "/tmp/x.png"}}, user("changed"), bot("new")])
    tree = switch(tree, 0, -1)  # the chat shows the old branch, with its second reply
    names = list(FIELDS)
    values = {**GenerationSettings(max_new_tokens=16).to_dict(), "seed": 4, "stop_words": ""}
    file = export_chat(path(tree), values, "demo", LIMITS, tree)
    data = json.loads(Path(file).read_text())
    assert data["version"] == 2 and len(data["branches"]["nodes"]) == 6
    assert all("/tmp/x.png" not in json.dumps(node) for node in data["branches"]["nodes"])  # files stay here
    imported, history, *restored = import_chat_tree(file, LIMITS, names)
    assert history == path(imported) and texts(imported) == texts(tree)
    assert dict(zip(names, restored, strict=True))["seed"] == 4
    assert versions(imported, 0) == (1, 2) and versions(imported, 4) == (2, 2)
    assert texts(switch(imported, 4, -1))[3:] == ["second", "two", "seed 2"]
    assert texts(switch(imported, 0, +1)) == ["changed", "new"]
