"""Conversation export/import: round trip, and every malformed file refused with a reason."""

from __future__ import annotations

import json

import pytest

from backend.conversation_io import MAX_FILE_BYTES, export_conversation, parse_conversation
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
