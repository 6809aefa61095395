"""Conversation export/import: round trip, and every malformed file refused with a reason."""

from __future__ import annotations

import json

import pytest

from backend.conversation_io import (
    MAX_FILE_BYTES,
    chosen_path,
    export_conversation,
    parse_conversation,
    read_conversation,
)
from backend.errors import BadInput
from backend.settings import GenerationSettings, ServerLimits

LIMITS = ServerLimits()
MESSAGES = [
    {"role": "user", "content": "<b>hi</b> & bye"},
    {"role": "assistant", "content": "héllo 👋\nline"},
]


def exported(**changes) -> bytes:
    settings = GenerationSettings(seed=7, mode="greedy", stop_words=("\n", "END")).to_dict()
    data = {**export_conversation(MESSAGES, settings, "demo"), **changes}
    return json.dumps(data).encode()


def test_round_trip_keeps_messages_and_settings():
    messages, settings = parse_conversation(exported(), LIMITS)
    assert messages == MESSAGES
    assert settings == GenerationSettings(seed=7, mode="greedy", stop_words=("\n", "END"))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b"[1, 2]", "not a conversation exported"),
        (json.dumps({"messages": []}).encode(), "not a conversation exported"),
        (exported(version=99), "version 99"),
        (exported(messages="hello"), "must be a list"),
        (exported(messages=[{"role": "system", "content": "x"}]), "role 'system'"),
        (exported(messages=[{"role": "user", "content": 5}]), "no text content"),
        (exported(messages=["text"]), "not an object"),
        (exported(messages=[{"role": "user", "content": "x" * 100_000}]), "too long"),
        (exported(settings={"top_p": 7}), "'top_p'"),
        (exported(settings={"evil": 1}), "'evil'"),
        (exported(settings=[]), "'settings' must be an object"),
        (b" " * (MAX_FILE_BYTES + 1), "bytes"),
    ],
)
def test_malformed_files_are_refused_with_a_reason(raw, expected):
    with pytest.raises(BadInput, match=expected):
        parse_conversation(raw, LIMITS)


# A file as version 1 wrote it (before branches and notes): it must keep importing.
VERSION_1 = b"""{
  "format": "chat-caption-playground/conversation", "version": 1, "model": "demo",
  "exported_at": "2026-11-30T10:00:00Z",
  "settings": {"seed": 3, "mode": "sample", "temperature": 0.7, "top_k": 50, "top_p": 0.95,
               "max_new_tokens": 32, "repetition_penalty": 1.1, "num_beams": 4, "stop_words": [],
               "system_prompt": "Be brief.", "adapter": "", "logprobs": -1},
  "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
}"""

NOTE_1 = {"role": "assistant", "content": "", "title": "seed 1"}
NOTE_2 = {"role": "assistant", "content": "", "title": "seed 2"}
BRANCHED = [  # "hi", answered twice: the second answer is the chosen one
    {"parent": None, "messages": [], "chosen": 0},
    {"parent": 0, "messages": [{"role": "user", "content": "hi"}], "chosen": 1},
    {"parent": 1, "messages": [{"role": "assistant", "content": "one"}, NOTE_1], "chosen": None},
    {"parent": 1, "messages": [{"role": "assistant", "content": "two"}, NOTE_2], "chosen": None},
]
CHOSEN = BRANCHED[1]["messages"] + BRANCHED[3]["messages"]


def branched(nodes=BRANCHED, messages=CHOSEN) -> bytes:
    return json.dumps(export_conversation(messages, GenerationSettings().to_dict(), "demo", nodes)).encode()


def test_version_1_files_still_import_as_one_branch():
    conversation = read_conversation(VERSION_1, LIMITS)
    assert [m["content"] for m in conversation.messages] == ["hi", "hello"]
    assert conversation.settings.seed == 3 and conversation.settings.system_prompt == "Be brief."
    assert [node["parent"] for node in conversation.nodes] == [None, 0]
    assert chosen_path(conversation.nodes) == conversation.messages


def test_branches_round_trip_with_their_numbers_lines():
    conversation = read_conversation(branched(), LIMITS)
    assert json.loads(branched())["version"] == 2
    assert conversation.messages == CHOSEN
    assert conversation.nodes == BRANCHED
    assert parse_conversation(branched(), LIMITS)[0] == CHOSEN  # the old reader's view: the chosen path


def nodes_with(index: int, **changes) -> list[dict]:
    return [({**node, **changes} if number == index else node) for number, node in enumerate(BRANCHED)]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (branched(nodes=[]), "1 to 1000 nodes"),
        (branched(nodes=nodes_with(0, parent=1)), "parent' must be null"),
        (branched(nodes=nodes_with(2, parent=2)), "has parent 2"),
        (branched(nodes=nodes_with(2, parent=7)), "has parent 7"),
        (branched(nodes=nodes_with(2, parent=True)), "has parent True"),
        (branched(nodes=nodes_with(1, chosen=2)), "chooses child 2; it has 2"),
        (branched(nodes=nodes_with(2, messages="x")), "'messages' must be a list"),
        (branched(nodes=nodes_with(2, messages=[{"role": "system", "content": "x"}])), "node 2, message 1"),
        (branched(nodes=nodes_with(2, messages=[{"role": "user", "content": "x", "title": 5}])), "'title'"),
        (branched(nodes=[*BRANCHED, "node"]), "node 4 is not an object"),
        (branched(messages=CHOSEN[:1]), "not the path its branches choose"),
        (branched(nodes=[BRANCHED[0], *[{"parent": 0, "messages": CHOSEN * 300}] * 2]), "more than 1000"),
    ],
)
def test_malformed_branches_are_refused_with_a_reason(raw, expected):
    with pytest.raises(BadInput, match=expected):
        read_conversation(raw, LIMITS)
