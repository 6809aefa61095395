from __future__ import annotations

import pytest
import torch

import backend.decode.generation as generation
from backend.decode.generation import GenerationUpdate, generate_beam, stream_generate
from backend.decode.stopping import REPLACEMENT_CHAR
from backend.settings import GenerationSettings

PROMPTS = ["Hello there, how are you?", "Tell me about cows.", "What is the weather like?"]
GREEDY = GenerationSettings(seed=0, mode="greedy", repetition_penalty=1.0, max_new_tokens=16)
SAMPLE = GenerationSettings(
    seed=11, temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.2, max_new_tokens=16
)


def settings_like(base: GenerationSettings, **changes) -> GenerationSettings:
    return GenerationSettings(**{**base.to_dict(), "stop_words": base.stop_words, **changes})


def prompt_ids(tokenizer, text: str = PROMPTS[0]) -> list[int]:
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def run(model, tokenizer, ids: list[int], settings: GenerationSettings) -> list[GenerationUpdate]:
    return list(stream_generate(model, tokenizer, ids, settings))


def padded_ids(model, tokenizer) -> list[int]:
    return list(range(len(tokenizer), model.config.vocab_size))


def hf_generate(model, tokenizer, ids: list[int], stop_strings: list[str] | None = None, **kwargs) -> str:
    """transformers' own generate(), asked not to emit ids the tokenizer cannot decode."""
    if stop_strings:
        kwargs.update(stop_strings=stop_strings, tokenizer=tokenizer)
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            suppress_tokens=padded_ids(model, tokenizer) or None,
            **kwargs,
        )
    new = out[0, len(ids) :].tolist()
    eos = model.generation_config.eos_token_id
    if eos in new:
        new = new[: new.index(eos)]
    return tokenizer.decode(new, skip_special_tokens=True)


def assert_growing(updates: list[GenerationUpdate]) -> None:
    for before, after in zip(updates, updates[1:], strict=False):
        assert after.text.startswith(before.text)
        assert after.new_tokens == before.new_tokens + 1
    assert all(not u.finished for u in updates[:-1])
    assert updates[-1].finished


@pytest.fixture
def chosen_ids(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every id stream_generate picks, in order."""
    picked: list[int] = []
    original = generation.choose_next_token

    def record(scores, settings, generator, probs=None):
        result = original(scores, settings, generator, probs)
        picked.append(int(result[0]))
        return result

    monkeypatch.setattr(generation, "choose_next_token", record)
    return picked


@pytest.fixture
def forward_calls(demo_model):
    calls: list[int] = []
    handle = demo_model.register_forward_hook(
        lambda module, args, kwargs, output: calls.append(1), with_kwargs=True
    )
    yield calls
    handle.remove()


def test_needs_concrete_seed(demo_model, demo_tokenizer) -> None:
    with pytest.raises(ValueError, match="seed"):
        next(
            stream_generate(
                demo_model, demo_tokenizer, prompt_ids(demo_tokenizer), settings_like(GREEDY, seed=-1)
            )
        )


def test_same_seed_same_text_whatever_the_global_rng(demo_model, demo_tokenizer) -> None:
    ids = prompt_ids(demo_tokenizer)
    torch.manual_seed(0)
    first = run(demo_model, demo_tokenizer, ids, SAMPLE)
    torch.manual_seed(12345)
    torch.rand(100)
    second = run(demo_model, demo_tokenizer, ids, SAMPLE)
    assert [u.text for u in first] == [u.text for u in second]
    assert first[-1].text
    texts = {run(demo_model, demo_tokenizer, ids, settings_like(SAMPLE, seed=s))[-1].text for s in range(4)}
    assert len(texts) > 1


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_sampling_matches_generate_with_the_same_seed(demo_model, demo_tokenizer, prompt: str) -> None:
    # generate() samples from the global RNG; a fresh generator with the same seed draws the same numbers.
    # Without top-k/top-p both draw over the whole vocabulary (with them we draw among the survivors
    # only: test_sampling checks those warpers against transformers' and the draws' frequencies).
    settings = settings_like(SAMPLE, top_k=0, top_p=1.0)
    ids = prompt_ids(demo_tokenizer, prompt)
    ours = run(demo_model, demo_tokenizer, ids, settings)[-1].text
    torch.manual_seed(settings.seed)
    theirs = hf_generate(
        demo_model,
        demo_tokenizer,
        ids,
        do_sample=True,
        temperature=settings.temperature,
        top_k=0,
        top_p=1.0,
        repetition_penalty=settings.repetition_penalty,
        max_new_tokens=settings.max_new_tokens,
    )
    assert ours == theirs


def test_greedy_is_argmax_of_full_forward_passes(demo_model, demo_tokenizer, chosen_ids) -> None:
    ids = prompt_ids(demo_tokenizer, PROMPTS[1])
    settings = settings_like(GREEDY, max_new_tokens=10)
    updates = run(demo_model, demo_tokenizer, ids, settings)
    vocab = len(demo_tokenizer)
    expected, sequence = [], list(ids)
    with torch.no_grad():
        for _ in range(settings.max_new_tokens):
            logits = demo_model(input_ids=torch.tensor([sequence]), use_cache=False).logits[0, -1, :vocab]
            expected.append(int(logits.argmax()))
            if expected[-1] == demo_tokenizer.eos_token_id:
                break
            sequence.append(expected[-1])
    assert chosen_ids == expected
    new = [t for t in expected if t != demo_tokenizer.eos_token_id]
    assert updates[-1].text == demo_tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_matches_generate(demo_model, demo_tokenizer, prompt: str, penalty: float) -> None:
    ids = prompt_ids(demo_tokenizer, prompt)
    settings = settings_like(GREEDY, repetition_penalty=penalty, max_new_tokens=20)
    updates = run(demo_model, demo_tokenizer, ids, settings)
    assert_growing(updates)
    theirs = hf_generate(
        demo_model, demo_tokenizer, ids, do_sample=False, max_new_tokens=20, repetition_penalty=penalty
    )
    assert updates[-1].text == theirs


@pytest.mark.parametrize("num_beams", [2, 3])
@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_beam_matches_generate(demo_model, demo_tokenizer, prompt: str, num_beams: int) -> None:
    ids = prompt_ids(demo_tokenizer, prompt)
    settings = GenerationSettings(
        seed=0, mode="beam", num_beams=num_beams, max_new_tokens=12, repetition_penalty=1.0
    )
    ours = generate_beam(demo_model, demo_tokenizer, ids, settings)
    theirs = hf_generate(
        demo_model,
        demo_tokenizer,
        ids,
        do_sample=False,
        num_beams=num_beams,
        max_new_tokens=12,
        early_stopping=True,
        repetition_penalty=1.0,
    )
    assert ours.text == theirs
    assert ours.finished and ours.finish_reason in ("length", "eos")
    assert ours.new_tokens <= 12


def test_beam_never_picks_ids_the_tokenizer_lacks(demo_model, demo_tokenizer, monkeypatch) -> None:
    assert padded_ids(demo_model, demo_tokenizer), "the demo model pads its embedding matrix"
    outputs = []
    original = demo_model.generate

    def spy(*args, **kwargs):
        outputs.append(original(*args, **kwargs))
        return outputs[-1]

    monkeypatch.setattr(demo_model, "generate", spy)
    for prompt in PROMPTS:
        settings = GenerationSettings(
            seed=0, mode="beam", num_beams=4, max_new_tokens=20, repetition_penalty=1.0
        )
        generate_beam(demo_model, demo_tokenizer, prompt_ids(demo_tokenizer, prompt), settings)
    assert max(int(out.max()) for out in outputs) < len(demo_tokenizer)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_beam_stop_word(demo_model, demo_tokenizer, prompt: str) -> None:
    ids = prompt_ids(demo_tokenizer, prompt)
    base = GenerationSettings(seed=0, mode="beam", num_beams=2, max_new_tokens=12, repetition_penalty=1.0)
    stop = stop_word_from(generate_beam(demo_model, demo_tokenizer, ids, base).text)
    ours = generate_beam(demo_model, demo_tokenizer, ids, settings_like(base, stop_words=(stop,)))
    theirs = hf_generate(
        demo_model,
        demo_tokenizer,
        ids,
        do_sample=False,
        num_beams=2,
        max_new_tokens=12,
        early_stopping=True,
        repetition_penalty=1.0,
        stop_strings=[stop],
    )
    assert ours.text == (theirs[: theirs.index(stop)] if stop in theirs else theirs)
    assert (ours.finish_reason == "stop_word") == (stop in theirs)
    assert stop not in ours.text


def stop_word_from(text: str) -> str:
    """Three characters from the 6th on (often spanning tokens), skipping undecoded bytes and blanks."""
    for start in range(5, len(text) - 3):
        candidate = text[start : start + 3]
        if candidate.strip() and REPLACEMENT_CHAR not in candidate:
            return candidate
    raise AssertionError(f"no usable stop word in {text!r}")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_stop_word_cuts_greedy_text(demo_model, demo_tokenizer, prompt: str) -> None:
    ids = prompt_ids(demo_tokenizer, prompt)
    full = run(demo_model, demo_tokenizer, ids, settings_like(GREEDY, max_new_tokens=24))[-1].text
    # Taken from the first 12 tokens' text, so a stopped run must end well before max_new_tokens.
    stop = stop_word_from(
        run(demo_model, demo_tokenizer, ids, settings_like(GREEDY, max_new_tokens=12))[-1].text
    )
    updates = run(
        demo_model, demo_tokenizer, ids, settings_like(GREEDY, max_new_tokens=24, stop_words=(stop,))
    )
    assert updates[-1].text == full[: full.index(stop)]
    assert updates[-1].finish_reason == "stop_word"
    assert updates[-1].finished
    assert updates[-1].new_tokens <= 12
    assert_growing(updates)
    assert all(stop not in u.text for u in updates)


def test_eos_first_gives_empty_reply(demo_model, demo_tokenizer, chosen_ids, monkeypatch) -> None:
    ids = prompt_ids(demo_tokenizer)
    run(demo_model, demo_tokenizer, ids, settings_like(GREEDY, max_new_tokens=3))
    first = chosen_ids[0]
    assert first != demo_tokenizer.eos_token_id
    monkeypatch.setattr(demo_model.generation_config, "eos_token_id", first)
    updates = run(demo_model, demo_tokenizer, ids, GREEDY)
    assert len(updates) == 1
    assert (updates[0].text, updates[0].new_tokens, updates[0].finished) == ("", 0, True)
    assert updates[0].finish_reason == "eos"


def test_eos_midway_keeps_text_before_it(demo_model, demo_tokenizer, chosen_ids, monkeypatch) -> None:
    ids = prompt_ids(demo_tokenizer, PROMPTS[1])
    run(demo_model, demo_tokenizer, ids, settings_like(GREEDY, max_new_tokens=12))
    greedy = list(chosen_ids)
    position = next(i for i in range(2, len(greedy)) if greedy[i] not in greedy[:i])
    monkeypatch.setattr(demo_model.generation_config, "eos_token_id", [1, greedy[position]])
    updates = run(demo_model, demo_tokenizer, ids, settings_like(GREEDY, max_new_tokens=12))
    assert updates[-1].finish_reason == "eos"
    assert updates[-1].new_tokens == position
    assert updates[-1].text == demo_tokenizer.decode(greedy[:position])


@pytest.mark.parametrize(
    "settings", [settings_like(GREEDY, max_new_tokens=5), settings_like(SAMPLE, max_new_tokens=7)]
)
def test_max_new_tokens_respected(demo_model, demo_tokenizer, forward_calls, settings) -> None:
    updates = run(demo_model, demo_tokenizer, prompt_ids(demo_tokenizer), settings)
    assert len(updates) == settings.max_new_tokens
    assert [u.new_tokens for u in updates] == list(range(1, settings.max_new_tokens + 1))
    assert updates[-1].finish_reason == "length"
    assert_growing(updates)
    # One prefill plus one step per further token: no forward pass is wasted after the last one.
    assert len(forward_calls) == settings.max_new_tokens


def test_closing_the_stream_stops_forward_passes(demo_model, demo_tokenizer, forward_calls) -> None:
    stream = stream_generate(
        demo_model, demo_tokenizer, prompt_ids(demo_tokenizer), settings_like(GREEDY, max_new_tokens=50)
    )
    next(stream)
    second = next(stream)
    assert second.new_tokens == 2 and not second.finished
    calls = len(forward_calls)
    assert calls == 2
    stream.close()
    assert len(forward_calls) == calls
    with pytest.raises(StopIteration):
        next(stream)
    assert len(forward_calls) == calls


def test_updates_report_timing(demo_model, demo_tokenizer) -> None:
    updates = run(
        demo_model, demo_tokenizer, prompt_ids(demo_tokenizer), settings_like(GREEDY, max_new_tokens=4)
    )
    first = updates[0].first_token_seconds
    assert first is not None and first > 0
    assert all(u.first_token_seconds == first for u in updates)
    assert all(a.seconds <= b.seconds for a, b in zip(updates, updates[1:], strict=False))
    assert updates[-1].tokens_per_second == pytest.approx(4 / updates[-1].seconds)


class SentencePieceLike:
    """Decodes like SentencePiece: '▁' is a space, and a leading space of the whole text is dropped."""

    pieces = ["<s>", "▁Hello", "▁world", "!", "▁again"]

    def __len__(self) -> int:
        return len(self.pieces)

    def decode(self, ids, skip_special_tokens=False) -> str:
        pieces = [self.pieces[i] for i in ids if not (skip_special_tokens and i == 0)]
        return "".join(pieces).replace("▁", " ").removeprefix(" ")


def test_continuation_keeps_the_leading_space_of_its_first_token() -> None:
    tokenizer = SentencePieceLike()
    decoder = generation.ContinuationDecoder(tokenizer, [0, 1])  # "<s> Hello"
    assert tokenizer.decode([2]) == "world"  # decoded alone, the space is lost
    assert decoder.decode([2]) == " world"
    assert decoder.decode([2, 3, 4]) == " world! again"
    assert generation.ContinuationDecoder(tokenizer, [0]).decode([1, 3]) == "Hello!"


class CountingTokenizer:
    """A tokenizer that counts the ids it is asked to decode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, []

    def __len__(self) -> int:
        return len(self.tokenizer)

    def decode(self, ids, skip_special_tokens=False) -> str:
        self.decoded.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize(
    "text", ["Grüße aus Köln 🌧️ und 日本語 too — fine.", " world! again" * 60, "🙂🙃" * 40]
)
def test_incremental_decoding_reads_as_decoding_everything_at_a_cost_that_does_not_grow(
    demo_tokenizer, text
) -> None:
    """Byte-level pieces of multibyte characters arrive one token at a time: every step's text is what
    decoding the whole continuation gives, and a step decodes a few ids, however long the reply."""
    prompt = demo_tokenizer.encode("Say something:")
    generated = demo_tokenizer.encode(text, add_special_tokens=False)
    counting = CountingTokenizer(demo_tokenizer)
    decoder = generation.ContinuationDecoder(counting, prompt)
    whole = generation.ContinuationDecoder(demo_tokenizer, prompt)
    for count in range(1, len(generated) + 1):
        counting.decoded.clear()
        assert decoder.decode(generated[:count]) == generation.safe_decode(
            demo_tokenizer, whole.context + generated[:count]
        )[whole.offset :]
        assert max(counting.decoded) <= 16, (count, counting.decoded)
    assert decoder.decode(generated).strip() == text.strip()  # and it is the text itself


def test_incremental_decoding_of_sentencepiece_like_pieces_and_of_a_reply_started_over() -> None:
    tokenizer = SentencePieceLike()
    decoder = generation.ContinuationDecoder(tokenizer, [0, 1])
    assert [decoder.decode([2, 3, 4, 2][:n]) for n in range(1, 5)] == [
        " world", " world!", " world! again", " world! again world"
    ]
    assert decoder.decode([3]) == "!"  # a shorter list is another reply: decoded from its start


class Ligatures(SentencePieceLike):
    """Reads 'a' then 'b' together as 'X': a later token changes how an earlier one reads."""

    pieces = ["<s>", "a", "b", "c"]

    def decode(self, ids, skip_special_tokens=False) -> str:
        return super().decode(ids, skip_special_tokens).replace("ab", "X")


def test_incremental_decoding_where_a_token_rereads_the_one_before_decodes_all_again() -> None:
    decoder = generation.ContinuationDecoder(Ligatures(), [0])
    assert [decoder.decode([1, 2, 3][:n]) for n in range(1, 4)] == ["a", "X", "Xc"]
