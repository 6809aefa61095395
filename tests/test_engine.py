"""The batching engine: shared forward passes, per-request results, joins, leaves, limits, failures."""

from __future__ import annotations

import threading
import time

import pytest

import backend.decode.engine as engine_module
from backend.decode.engine import Engine, EngineLimits
from backend.decode.generation import generate_beam, stream_generate
from backend.errors import ServerBusy
from backend.settings import GenerationSettings
from tests.streams import last_items_together

PROMPTS = ["Hello there", "The weather today is", "Tell me a long story about a cat and a dog", "Hi"]


@pytest.fixture
def engine(demo_model, demo_tokenizer):
    engine = Engine(
        demo_model, demo_tokenizer, EngineLimits(max_batch_size=8, max_queue=8, poll_seconds=0.05)
    )
    yield engine
    engine.close()


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def final(handle):
    updates = [u for u in handle if u.queue_position is None]
    return updates[-1]


def solo(model, tokenizer, text: str, settings: GenerationSettings):
    return list(stream_generate(model, tokenizer, ids(tokenizer, text), settings))[-1]


class ForwardCounter:
    def __init__(self, model, delay: float = 0.0):
        self.model, self.calls, self.delay = model, 0, delay
        self.original = model.forward

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        return self.original(*args, **kwargs)


def run_together(engine, tokenizer, jobs):
    """Submit every (text, settings) at once and collect final updates in order."""
    handles = [engine.submit(ids(tokenizer, text), settings) for text, settings in jobs]
    return last_items_together([(u for u in handle if u.queue_position is None) for handle in handles])


def mixed_settings(index: int) -> GenerationSettings:
    return GenerationSettings(
        seed=100 + index,
        temperature=[0.7, 1.0, 1.3, 0.0][index % 4],
        top_k=[50, 0, 10, 5][index % 4],
        top_p=[0.95, 0.8, 1.0, 0.5][index % 4],
        repetition_penalty=[1.1, 1.0, 1.3, 1.0][index % 4],
        max_new_tokens=[12, 20, 7, 16][index % 4],
    )


def test_each_request_gets_what_it_would_get_alone(engine, demo_model, demo_tokenizer):
    jobs = [(text, mixed_settings(i)) for i, text in enumerate(PROMPTS)]
    together = run_together(engine, demo_tokenizer, jobs)
    for (text, settings), result in zip(jobs, together, strict=True):
        alone = solo(demo_model, demo_tokenizer, text, settings)
        assert (result.text, result.new_tokens, result.finish_reason) == (
            alone.text,
            alone.new_tokens,
            alone.finish_reason,
        ), text


def test_overlapping_requests_share_forward_passes(engine, demo_model, demo_tokenizer, monkeypatch):
    counter = ForwardCounter(demo_model)
    monkeypatch.setattr(demo_model, "forward", counter)
    settings = [GenerationSettings(seed=i, max_new_tokens=20, stop_words=()) for i in range(4)]
    results = run_together(engine, demo_tokenizer, list(zip(PROMPTS, settings, strict=True)))
    generated = sum(result.new_tokens for result in results)
    assert generated >= 40  # the random model rarely hits EOS this early
    # One prefill each, then at most one step per token of the longest reply: far fewer than one per token.
    assert counter.calls <= len(PROMPTS) + 20
    assert counter.calls < generated


def test_a_late_request_joins_without_waiting(engine, demo_model, demo_tokenizer, monkeypatch):
    monkeypatch.setattr(demo_model, "forward", ForwardCounter(demo_model, delay=0.01))
    long = engine.submit(ids(demo_tokenizer, PROMPTS[2]), GenerationSettings(seed=1, max_new_tokens=120))
    long_stream = iter(long)  # held: a dropped stream is closed, which cancels the request
    first = next(long_stream)
    assert first.new_tokens == 1
    late = engine.submit(
        ids(demo_tokenizer, "Hi"), GenerationSettings(seed=2, max_new_tokens=5, mode="greedy")
    )
    late_result = final(late)
    deadline = time.time() + 2
    while engine.stats()[0] > 1 and time.time() < deadline:  # the late row leaves at the next step
        time.sleep(0.005)
    assert engine.stats()[0] == 1  # the long one is still decoding when the late one is done
    long.cancel()
    greedy = GenerationSettings(seed=0, max_new_tokens=5, mode="greedy")
    expected = solo(demo_model, demo_tokenizer, "Hi", greedy)
    assert late_result.text == expected.text


def test_cancel_affects_only_that_request_and_frees_its_row(engine, demo_model, demo_tokenizer, monkeypatch):
    monkeypatch.setattr(demo_model, "forward", ForwardCounter(demo_model, delay=0.005))
    keep_settings = GenerationSettings(seed=9, max_new_tokens=30)
    victim = engine.submit(ids(demo_tokenizer, PROMPTS[0]), GenerationSettings(seed=8, max_new_tokens=200))
    keeper = engine.submit(ids(demo_tokenizer, PROMPTS[1]), keep_settings)
    stream = iter(victim)
    for _ in range(3):
        next(stream)
    stream.close()  # what Gradio does on Stop or a closed tab
    kept = final(keeper)
    assert kept.text == solo(demo_model, demo_tokenizer, PROMPTS[1], keep_settings).text
    deadline = time.time() + 5
    while engine.stats() != (0, 0) and time.time() < deadline:
        time.sleep(0.01)
    assert engine.stats() == (0, 0)


def test_full_queue_says_busy_at_once_and_waiting_requests_know_their_place(demo_model, demo_tokenizer):
    engine = Engine(
        demo_model, demo_tokenizer, EngineLimits(max_batch_size=1, max_queue=2, poll_seconds=0.02)
    )
    try:
        settings = GenerationSettings(seed=1, max_new_tokens=400)
        running = engine.submit(ids(demo_tokenizer, "a"), settings)
        running_stream = iter(running)  # held: a dropped stream cancels its request
        next(running_stream)  # admitted and decoding
        waiting = [
            engine.submit(ids(demo_tokenizer, "b"), settings),
            engine.submit(ids(demo_tokenizer, "c"), settings),
        ]
        assert [handle.position() for handle in waiting] == [1, 2]
        started = time.perf_counter()
        with pytest.raises(ServerBusy, match="busy"):
            engine.submit(ids(demo_tokenizer, "d"), settings)
        assert time.perf_counter() - started < 0.5
        waiting_stream = iter(waiting[1])
        update = next(waiting_stream)
        assert update.queue_position == 2 and update.text == ""
        # Cancelled requests give their places back at once, to those behind and to newcomers.
        waiting[0].cancel()
        assert waiting[1].position() == 1
        newcomer = engine.submit(ids(demo_tokenizer, "d"), settings)
        assert newcomer.position() == 2 and engine.stats() == (1, 2)
        for handle in [running, waiting[1], newcomer]:
            handle.cancel()
        assert engine.stats()[1] == 0
    finally:
        engine.close()


def test_beam_runs_beside_the_batch(engine, demo_model, demo_tokenizer, monkeypatch):
    release = threading.Event()

    def slow_beam(*args, **kwargs):
        release.wait(30)
        return generate_beam(*args, **kwargs)

    monkeypatch.setattr(engine_module, "generate_beam", slow_beam)
    beam_settings = GenerationSettings(mode="beam", num_beams=3, max_new_tokens=8)
    beam = engine.submit_beam(ids(demo_tokenizer, "Hello"), beam_settings)
    quick = final(engine.submit(ids(demo_tokenizer, "Hi"), GenerationSettings(seed=1, max_new_tokens=6)))
    assert quick.finished  # sampling went on while the beam search was still running
    release.set()
    result = final(beam)
    assert (
        result.text
        == generate_beam(demo_model, demo_tokenizer, ids(demo_tokenizer, "Hello"), beam_settings).text
    )


def test_a_failing_step_fails_its_batch_not_the_engine(engine, demo_model, demo_tokenizer, monkeypatch):
    original, calls = demo_model.forward, {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected")
        return original(*args, **kwargs)

    monkeypatch.setattr(demo_model, "forward", failing)
    handle = engine.submit(ids(demo_tokenizer, "Hello"), GenerationSettings(seed=1, max_new_tokens=10))
    with pytest.raises(RuntimeError, match="injected"):
        list(handle)
    monkeypatch.setattr(demo_model, "forward", original)
    assert final(
        engine.submit(ids(demo_tokenizer, "Hello"), GenerationSettings(seed=1, max_new_tokens=4))
    ).finished


def test_greedy_through_the_engine_equals_transformers_generate(engine, demo_model, demo_tokenizer):
    prompt = ids(demo_tokenizer, PROMPTS[1])
    ours = final(
        engine.submit(prompt, GenerationSettings(mode="greedy", max_new_tokens=12, repetition_penalty=1.0))
    )
    import torch

    with torch.no_grad():
        theirs = demo_model.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=12,
            suppress_tokens=list(range(len(demo_tokenizer), demo_model.config.vocab_size)),
        )
    expected = demo_tokenizer.decode(theirs[0, len(prompt) :], skip_special_tokens=True)
    assert ours.text.strip() == expected.strip()


def test_each_beam_search_runs_on_a_thread_that_ends(engine, demo_tokenizer, monkeypatch):
    """No lasting beam worker: a lasting thread that ran torch keeps an OpenMP team (torch_threads)."""
    ran_on = []

    def recording_beam(*args, **kwargs):
        ran_on.append(threading.current_thread())
        return generate_beam(*args, **kwargs)

    monkeypatch.setattr(engine_module, "generate_beam", recording_beam)
    settings = GenerationSettings(mode="beam", num_beams=2, max_new_tokens=4)
    for _ in range(2):
        final(engine.submit_beam(ids(demo_tokenizer, "Hello"), settings))
    assert len(ran_on) == 2
    for thread in ran_on:
        thread.join(5)
        assert not thread.is_alive() and thread.name == "beam"


@pytest.fixture(scope="module")
def sliding_model(demo_tokenizer):
    """A tiny Mistral whose 6-token attention window is shorter than the prompts."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=-(-len(demo_tokenizer) // 64) * 64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        sliding_window=6,
        bos_token_id=demo_tokenizer.bos_token_id,
        eos_token_id=demo_tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return MistralForCausalLM(config).eval()


def test_sliding_window_models_batch_like_they_run_alone(sliding_model, demo_tokenizer):
    """Mistral/Gemma-style windows: left padding, joins and leaves must not shift what a row sees."""
    engine = Engine(sliding_model, demo_tokenizer, EngineLimits(max_batch_size=8, max_queue=8))
    try:
        jobs = [(text, mixed_settings(i)) for i, text in enumerate(PROMPTS)]
        together = run_together(engine, demo_tokenizer, jobs)
        late = GenerationSettings(seed=7, max_new_tokens=10)
        early = engine.submit(ids(demo_tokenizer, PROMPTS[2]), GenerationSettings(seed=8, max_new_tokens=25))
        early_updates = iter(early)  # kept: a dropped iterator cancels its request
        next(early_updates)
        joined = final(engine.submit(ids(demo_tokenizer, PROMPTS[1]), late))  # joins mid-flight
        for (text, settings), result in [*zip(jobs, together, strict=True), ((PROMPTS[1], late), joined)]:
            alone = solo(sliding_model, demo_tokenizer, text, settings)
            assert (result.text, result.new_tokens) == (alone.text, alone.new_tokens), text
        assert [u for u in early_updates if u.queue_position is None][-1].finished
    finally:
        engine.close()


def test_the_engine_thread_ends_when_idle_and_the_next_request_starts_another(demo_model, demo_tokenizer):
    engine = Engine(demo_model, demo_tokenizer, EngineLimits(idle_seconds=0.1))
    try:
        settings = GenerationSettings(seed=1, max_new_tokens=4)
        first = final(engine.submit(ids(demo_tokenizer, "Hello"), settings))
        thread = engine._thread
        thread.join(5)
        assert not thread.is_alive() and engine._thread is None  # its OpenMP team went with it
        second = final(engine.submit(ids(demo_tokenizer, "Hello"), settings))
        assert second.text == first.text and engine._thread is not thread
    finally:
        engine.close()


def test_a_newcomer_that_cannot_join_fails_with_the_batch_instead_of_hanging(
    engine, demo_tokenizer, monkeypatch
):
    running = iter(engine.submit(ids(demo_tokenizer, "a"), GenerationSettings(seed=1, max_new_tokens=200)))
    next(running)  # decoding

    def broken(*args):
        raise RuntimeError("cannot stack the caches")

    monkeypatch.setattr(engine_module, "_stack_caches", broken)
    newcomer = engine.submit(ids(demo_tokenizer, "b"), GenerationSettings(seed=2, max_new_tokens=5))
    outcomes = {}

    def drain(name, updates):
        try:
            list(updates)
            outcomes[name] = "finished"
        except RuntimeError as error:
            outcomes[name] = str(error)

    threads = [
        threading.Thread(target=drain, args=item) for item in [("running", running), ("new", newcomer)]
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert outcomes.get("new") == "cannot stack the caches"
    monkeypatch.undo()
    assert final(
        engine.submit(ids(demo_tokenizer, "c"), GenerationSettings(seed=3, max_new_tokens=3))
    ).finished


def test_a_cancelled_waiting_beam_search_gives_its_place_back(demo_model, demo_tokenizer, monkeypatch):
    engine = Engine(demo_model, demo_tokenizer, EngineLimits(max_queue=1, beam_workers=1, poll_seconds=0.02))
    release = threading.Event()

    def slow_beam(*args, **kwargs):
        release.wait(30)
        return generate_beam(*args, **kwargs)

    monkeypatch.setattr(engine_module, "generate_beam", slow_beam)
    settings = GenerationSettings(mode="beam", num_beams=2, max_new_tokens=4)
    try:
        running = engine.submit_beam(ids(demo_tokenizer, "Hello"), settings)
        waiting = engine.submit_beam(ids(demo_tokenizer, "Hi"), settings)
        with pytest.raises(ServerBusy):
            engine.submit_beam(ids(demo_tokenizer, "Hey"), settings)
        waiting.cancel()
        deadline = time.monotonic() + 5
        while engine.pending() > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        later = engine.submit_beam(ids(demo_tokenizer, "Hey"), settings)  # the cancelled one's place
        release.set()
        assert final(running).finished and final(later).finished
    finally:
        release.set()
        engine.close()
