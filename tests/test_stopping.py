from __future__ import annotations

import pytest

from backend.decode.stopping import REPLACEMENT_CHAR, StopCut, StopWordMatcher, safe_decode


def safe_prefix(text: str, stop_words: tuple[str, ...]) -> tuple[str, bool]:
    """Reference: the longest prefix no stop word (whole, or still growing at the end) can overlap."""
    for start in range(len(text) + 1):
        rest = text[start:]
        if any(rest.startswith(w) for w in stop_words):
            return text[:start], True
        if rest and any(w.startswith(rest) for w in stop_words):
            return text[:start], False
    return text, False


def test_no_stop_words_shows_everything() -> None:
    matcher = StopWordMatcher(())
    assert matcher.feed("USER: anything") == StopCut("USER: anything", False)
    assert StopWordMatcher(["", ""]).feed("abc") == StopCut("abc", False)


def test_stop_word_starting_mid_token() -> None:
    assert StopWordMatcher(("USER:",)).feed("abcUSER:") == StopCut("abc", True)
    assert StopWordMatcher(("USER:",)).feed("abcUSER: and more") == StopCut("abc", True)


def test_stop_word_across_feeds() -> None:
    matcher = StopWordMatcher(("USER:",))
    assert matcher.feed("Hello U") == StopCut("Hello ", False)
    assert matcher.feed("Hello US") == StopCut("Hello ", False)
    assert matcher.feed("Hello USE") == StopCut("Hello ", False)
    assert matcher.feed("Hello USER: next") == StopCut("Hello ", True)


def test_first_of_several_stop_words_wins() -> None:
    matcher = StopWordMatcher(("END", "\n\n"))
    assert matcher.feed("one\n\ntwo END") == StopCut("one", True)
    assert matcher.feed("one END\n\n") == StopCut("one ", True)
    assert matcher.first_stop("no stop here") is None


def test_partial_stop_word_released_when_it_diverges() -> None:
    matcher = StopWordMatcher(("USER:",))
    assert matcher.feed("I USE").visible == "I "
    assert matcher.feed("I USEFUL") == StopCut("I USEFUL", False)


def test_final_releases_held_text() -> None:
    matcher = StopWordMatcher(("USER:",))
    assert matcher.feed("bye US").visible == "bye "
    assert matcher.feed("bye US", final=True) == StopCut("bye US", False)
    # A whole stop word is cut even in the final feed.
    assert matcher.feed("bye USER:", final=True) == StopCut("bye ", True)


@pytest.mark.parametrize(
    ("stream", "stop_words"),
    [
        ("I said USEFUL things. US and USE. USER: bye", ("USER:",)),
        ("a\nb\n\nc", ("\n\n",)),
        ("x ## ### #### end", ("####", "</s>")),
        ("ab</ ab</s", ("</s>", "abc")),
    ],
)
def test_char_by_char_stream(stream: str, stop_words: tuple[str, ...]) -> None:
    matcher = StopWordMatcher(stop_words)
    expected_final, _ = safe_prefix(stream + "\0", stop_words)  # \0 ends any partial stop word
    expected_final = expected_final.rstrip("\0")
    shown: list[str] = []
    for end in range(1, len(stream) + 1):
        final = end == len(stream)
        cut = matcher.feed(stream[:end], final=final)
        reference, stopped = safe_prefix(stream[:end], stop_words)
        if final and not stopped:
            reference = stream
        assert cut.visible == reference, stream[:end]
        assert cut.stopped == stopped
        assert not any(w in cut.visible for w in stop_words)
        if not final:
            # No stop word, whole or still growing, may begin inside what was shown.
            fed = stream[:end]
            for start in range(len(cut.visible)):
                assert not any(fed[start:].startswith(w) or w.startswith(fed[start:]) for w in stop_words)
        shown.append(cut.visible)
        if cut.stopped:
            break
    for before, after in zip(shown, shown[1:], strict=False):
        assert after.startswith(before)
    assert shown[-1] == expected_final


def test_trailing_replacement_char_held_back() -> None:
    matcher = StopWordMatcher(())
    assert matcher.feed("caf" + REPLACEMENT_CHAR).visible == "caf"
    assert matcher.feed("caf" + REPLACEMENT_CHAR * 2).visible == "caf"
    assert matcher.feed("caf" + REPLACEMENT_CHAR, final=True).visible == "caf" + REPLACEMENT_CHAR
    # Only a trailing one may still become a character; one in the middle is shown.
    assert matcher.feed("a" + REPLACEMENT_CHAR + "b").visible == "a" + REPLACEMENT_CHAR + "b"
    with_stop = StopWordMatcher(("USER:",))
    assert with_stop.feed("ok" + REPLACEMENT_CHAR + "US").visible == "ok"


def test_safe_decode_drops_out_of_range_ids(demo_tokenizer) -> None:
    ids = demo_tokenizer("hello world", add_special_tokens=False)["input_ids"]
    size = len(demo_tokenizer)
    noisy = [-1, *ids[:1], 10**6, size, *ids[1:], -5, size + 63]
    assert safe_decode(demo_tokenizer, noisy) == "hello world"
    assert safe_decode(demo_tokenizer, [-1, 10**6]) == ""
    assert safe_decode(demo_tokenizer, []) == ""


def test_safe_decode_skips_special_tokens(demo_tokenizer) -> None:
    ids = demo_tokenizer("hi there", add_special_tokens=True)["input_ids"]
    assert ids[0] == demo_tokenizer.bos_token_id
    assert safe_decode(demo_tokenizer, ids + [demo_tokenizer.eos_token_id]) == "hi there"
