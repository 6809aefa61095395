"""The batching engine: shared forward passes, per-request results, joins, leaves, limits, failures."""

from __future__ import annotations

import threading

import pytest

import backend.decode.beam_jobs as beam_jobs_module
from backend.decode.engine import Engine, EngineLimits
from backend.decode.generation import generate_beam, stream_generate
from backend.errors import ServerBusy
from backend.settings import GenerationSettings
from tests import streams as stream_helpers
from tests.streams import (
    HANG,
    last_items_together,
    no_early_end,
    plugged,
    wait_until,
    wait_until_idle,
)

watch_forwards = stream_helpers.watch_forwards  # a fixture: tests ask for it by name

PROMPTS = ["Hello there", "The weather today is", "Tell me a long story about a cat and a dog", "Hi"]


@pytest.fixture
def engine(demo_model, demo_tokenizer):
    engine = Engine(
        demo_model,
        demo_tokenizer,
        EngineLimits(max_batch_size=8, max_queue=8, poll_seconds=0.05, idle_seconds=0.05),
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


def test_overlapping_requests_share_forward_passes(
    engine, demo_model, demo_tokenizer, monkeypatch, watch_forwards
):
    no_early_end(monkeypatch)  # every reply runs its full 20 tokens
    forwards = watch_forwards(demo_model, stats=engine.stats)
    settings = [GenerationSettings(seed=i, max_new_tokens=20, stop_words=()) for i in range(4)]
    with plugged(engine, ids(demo_tokenizer, "plug")):  # all four are queued before any is admitted
        handles = [
            engine.submit(ids(demo_tokenizer, text), s) for text, s in zip(PROMPTS, settings, strict=True)
        ]
    results = last_items_together([(u for u in handle if u.queue_position is None) for handle in handles])
    assert [result.new_tokens for result in results] == [20] * 4
    # After the prefill, one decode step per token for all four together: 19 steps, not 76.
    assert forwards.steps() == [4] * 19


def test_a_late_request_joins_without_waiting(
    engine, demo_model, demo_tokenizer, monkeypatch, watch_forwards
):
    no_early_end(monkeypatch)  # the long reply cannot end before its 120 tokens
    forwards = watch_forwards(demo_model, hold_at=1, stats=engine.stats)  # the long one's first step waits
    long = engine.submit(ids(demo_tokenizer, PROMPTS[2]), GenerationSettings(seed=1, max_new_tokens=120))
    long_stream = iter(long)  # held: a dropped stream is closed, which cancels the request
    first = next(long_stream)
    assert first.new_tokens == 1
    forwards.wait_held()
    late = engine.submit(
        ids(demo_tokenizer, "Hi"), GenerationSettings(seed=2, max_new_tokens=5, mode="greedy")
    )
    forwards.go_on.set()
    late_result = final(late)
    # The long one's held step, then the late one's four steps shared with the long one (which had 6 of
    # its 120 tokens when the late one finished), then the long one alone.
    wait_until(lambda: len(forwards.steps()) >= 6, "the long one's next step")
    assert forwards.steps()[:6] == [1, 2, 2, 2, 2, 1]
    long.cancel()
    greedy = GenerationSettings(seed=0, max_new_tokens=5, mode="greedy")
    expected = solo(demo_model, demo_tokenizer, "Hi", greedy)
    assert (late_result.text, late_result.new_tokens) == (expected.text, 5)


def test_cancel_affects_only_that_request_and_frees_its_row(
    engine, demo_model, demo_tokenizer, monkeypatch, watch_forwards
):
    no_early_end(monkeypatch)  # only the cancel can end the victim's reply before its 400 tokens
    # The third decode step, with 3 tokens of each reply out, waits for the cancel.
    forwards = watch_forwards(demo_model, hold_at=3, stats=engine.stats)
    keep_settings = GenerationSettings(seed=9, max_new_tokens=30)
    with plugged(engine, ids(demo_tokenizer, "plug")):  # both start together
        victim = engine.submit(
            ids(demo_tokenizer, PROMPTS[0]), GenerationSettings(seed=8, max_new_tokens=400)
        )
        keeper = engine.submit(ids(demo_tokenizer, PROMPTS[1]), keep_settings)
    stream = iter(victim)
    forwards.wait_held()
    received = [next(stream) for _ in range(3)]
    stream.close()  # what Gradio does on Stop or a closed tab
    forwards.go_on.set()
    kept = final(keeper)
    wait_until_idle(engine)  # no forward pass can follow
    assert [update.new_tokens for update in received] == [1, 2, 3]
    alone = solo(demo_model, demo_tokenizer, PROMPTS[1], keep_settings)
    assert (kept.text, kept.new_tokens) == (alone.text, 30)
    # The victim shared the step it was cancelled in and left after it; the keeper went on alone.
    assert forwards.steps() == [2] * 3 + [1] * 26
    assert engine.stats() == (0, 0)


def test_full_queue_says_busy_at_once_and_waiting_requests_know_their_place(
    demo_model, demo_tokenizer, monkeypatch, watch_forwards
):
    engine = Engine(
        demo_model, demo_tokenizer, EngineLimits(max_batch_size=1, max_queue=2, poll_seconds=0.02)
    )
    # The running request stays in its first decode step until the end: no place can free up meanwhile.
    forwards = watch_forwards(demo_model, hold_at=1)
    try:
        settings = GenerationSettings(seed=1, max_new_tokens=400)
        running = engine.submit(ids(demo_tokenizer, "a"), settings)
        running_stream = iter(running)  # held: a dropped stream cancels its request
        next(running_stream)  # admitted and decoding
        forwards.wait_held()
        waiting = [
            engine.submit(ids(demo_tokenizer, "b"), settings),
            engine.submit(ids(demo_tokenizer, "c"), settings),
        ]
        assert [handle.position() for handle in waiting] == [1, 2]
        # At once: nothing frees a place while the engine is held, so a submit that waited for room would
        # never return (the pytest timeout would fail it) instead of raising here.
        with pytest.raises(ServerBusy, match="busy"):
            engine.submit(ids(demo_tokenizer, "d"), settings)
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
        assert len(forwards.steps()) == 1  # all of it happened while the running request was held
    finally:
        forwards.go_on.set()
        engine.close()


def test_beam_runs_beside_the_batch(engine, demo_model, demo_tokenizer, monkeypatch):
    started, release, returned = threading.Event(), threading.Event(), threading.Event()

    def slow_beam(*args, **kwargs):
        started.set()
        try:
            assert release.wait(HANG), "the test never released the beam search"
            return generate_beam(*args, **kwargs)
        finally:
            returned.set()

    monkeypatch.setattr(beam_jobs_module, "generate_beam", slow_beam)
    beam_settings = GenerationSettings(mode="beam", num_beams=3, max_new_tokens=8)
    beam = engine.submit_beam(ids(demo_tokenizer, "Hello"), beam_settings)
    assert started.wait(HANG)
    quick = final(engine.submit(ids(demo_tokenizer, "Hi"), GenerationSettings(seed=1, max_new_tokens=6)))
    assert quick.finished and not returned.is_set()  # sampling went on while the beam search was waiting
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
        engine.submit(
            prompt, GenerationSettings(seed=0, mode="greedy", max_new_tokens=12, repetition_penalty=1.0)
        )
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

    monkeypatch.setattr(beam_jobs_module, "generate_beam", recording_beam)
    settings = GenerationSettings(mode="beam", num_beams=2, max_new_tokens=4)
    for _ in range(2):
        final(engine.submit_beam(ids(demo_tokenizer, "Hello"), settings))
    assert len(ran_on) == 2
    for thread in ran_on:
        thread.join(HANG)
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


def test_sliding_window_models_batch_like_they_run_alone(
    sliding_model, demo_tokenizer, monkeypatch, watch_forwards
):
    """Mistral/Gemma-style windows: left padding, joins and leaves must not shift what a row sees."""
    engine = Engine(sliding_model, demo_tokenizer, EngineLimits(max_batch_size=8, max_queue=8))
    forwards = None
    try:
        jobs = [(text, mixed_settings(i)) for i, text in enumerate(PROMPTS)]
        together = run_together(engine, demo_tokenizer, jobs)
        late = GenerationSettings(seed=7, max_new_tokens=10)
        # The early one's first decode step waits until the late one is queued.
        forwards = watch_forwards(sliding_model, hold_at=1, stats=engine.stats)
        early = engine.submit(ids(demo_tokenizer, PROMPTS[2]), GenerationSettings(seed=8, max_new_tokens=25))
        early_updates = iter(early)  # kept: a dropped iterator cancels its request
        next(early_updates)
        forwards.wait_held()
        late_handle = engine.submit(ids(demo_tokenizer, PROMPTS[1]), late)
        forwards.go_on.set()
        joined = final(late_handle)
        assert forwards.steps()[:2] == [1, 2]  # it joined mid-flight: the next step decoded both
        for (text, settings), result in [*zip(jobs, together, strict=True), ((PROMPTS[1], late), joined)]:
            alone = solo(sliding_model, demo_tokenizer, text, settings)
            assert (result.text, result.new_tokens) == (alone.text, alone.new_tokens), text
        assert [u for u in early_updates if u.queue_position is None][-1].finished
    finally:
        if forwards is not None:
            forwards.go_on.set()
        engine.close()


def test_the_engine_thread_ends_when_idle_and_the_next_request_starts_another(demo_model, demo_tokenizer):
    engine = Engine(demo_model, demo_tokenizer, EngineLimits(idle_seconds=0.1))
    try:
        settings = GenerationSettings(seed=1, max_new_tokens=4)
        first = final(engine.submit(ids(demo_tokenizer, "Hello"), settings))
        thread = engine._thread
        thread.join(HANG)
        assert not thread.is_alive() and engine._thread is None  # its OpenMP team went with it
        second = final(engine.submit(ids(demo_tokenizer, "Hello"), settings))
        assert second.text == first.text and engine._thread is not thread
    finally:
        engine.close()


def test_a_failed_prefill_fails_its_newcomer_alone_and_a_failed_step_fails_its_batch(
    engine, demo_model, demo_tokenizer, monkeypatch, watch_forwards
):
    no_early_end(monkeypatch)  # the running reply is still decoding when the newcomer comes
    forwards = watch_forwards(demo_model, hold_at=1)  # its first decode step waits for the newcomer
    running = iter(engine.submit(ids(demo_tokenizer, "a b"), GenerationSettings(seed=1, max_new_tokens=20)))
    next(running)  # decoding
    forwards.wait_held()

    def unreadable():
        raise RuntimeError("this image cannot be read")

    newcomer = engine.submit(
        ids(demo_tokenizer, "b c"), GenerationSettings(seed=2, max_new_tokens=5), unreadable
    )
    forwards.go_on.set()
    with pytest.raises(RuntimeError, match="cannot be read"):
        list(newcomer)
    assert [u for u in running][-1].new_tokens == 20  # the running reply went on to its end, unharmed

    original, steps = engine._decode_step, []

    def failing_once():
        steps.append(len(steps))
        if len(steps) == 1:
            raise RuntimeError("out of memory in a decode step")
        original()

    monkeypatch.setattr(engine, "_decode_step", failing_once)
    pair = [
        engine.submit(ids(demo_tokenizer, text), GenerationSettings(seed=3, max_new_tokens=5))
        for text in "cd"
    ]
    outcomes = {}

    def drain(name, updates):
        try:
            list(updates)
            outcomes[name] = "finished"
        except RuntimeError as error:
            outcomes[name] = str(error)

    threads = [threading.Thread(target=drain, args=(n, h), daemon=True) for n, h in enumerate(pair)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG)
        assert not thread.is_alive()
    assert set(outcomes.values()) <= {"out of memory in a decode step", "finished"}
    assert "out of memory in a decode step" in outcomes.values()  # its batch fails, with the reason
    assert final(
        engine.submit(ids(demo_tokenizer, "e f"), GenerationSettings(seed=4, max_new_tokens=3))
    ).finished
    wait_until_idle(engine)  # the last reply's room goes back a moment after its last update
    assert engine.kv_usage()[0] == 0  # and the failed rows gave theirs back


def test_a_cancelled_waiting_beam_search_gives_its_place_back(demo_model, demo_tokenizer, monkeypatch):
    engine = Engine(demo_model, demo_tokenizer, EngineLimits(max_queue=1, beam_workers=1, poll_seconds=0.02))
    started, release = threading.Event(), threading.Event()

    def slow_beam(*args, **kwargs):
        started.set()
        assert release.wait(HANG), "the test never released the beam search"
        return generate_beam(*args, **kwargs)

    monkeypatch.setattr(beam_jobs_module, "generate_beam", slow_beam)
    settings = GenerationSettings(mode="beam", num_beams=2, max_new_tokens=4)
    try:
        running = engine.submit_beam(ids(demo_tokenizer, "Hello"), settings)
        assert started.wait(HANG)  # it has the one turn: the next one waits
        waiting = engine.submit_beam(ids(demo_tokenizer, "Hi"), settings)
        with pytest.raises(ServerBusy):
            engine.submit_beam(ids(demo_tokenizer, "Hey"), settings)
        waiting.cancel()
        wait_until(lambda: engine.pending() == 1, "the cancelled beam search left")
        later = engine.submit_beam(ids(demo_tokenizer, "Hey"), settings)  # the cancelled one's place
        release.set()
        assert final(running).finished and final(later).finished
    finally:
        release.set()
        engine.close()


def test_users_who_arrive_during_an_idle_engines_first_prefill_decode_from_its_first_step(
    demo_model, demo_tokenizer, monkeypatch
):
    """A burst: the first user's prefill starts at once (no window before it), and those who come while it
    runs join before the first decode step, not one step later."""
    no_early_end(monkeypatch)
    prefilling, release = threading.Event(), threading.Event()
    admit, decode_step = Engine._admit, Engine._decode_step
    rows_per_step: list[int] = []

    def held_admit(self, pending):
        prefilling.set()
        assert release.wait(HANG), "the test never let the prefill go on"
        return admit(self, pending)

    def counted_step(self):
        rows_per_step.append(len(self._rows))
        return decode_step(self)

    monkeypatch.setattr(Engine, "_admit", held_admit)
    monkeypatch.setattr(Engine, "_decode_step", counted_step)
    engine = Engine(demo_model, demo_tokenizer, EngineLimits(idle_seconds=0.05))
    try:
        first = engine.submit(ids(demo_tokenizer, PROMPTS[0]), GenerationSettings(seed=1, max_new_tokens=4))
        assert prefilling.wait(HANG)  # the first user's prefill began with nobody else there
        others = [
            engine.submit(ids(demo_tokenizer, text), GenerationSettings(seed=2, max_new_tokens=4))
            for text in PROMPTS[1:]
        ]
        release.set()
        assert all(final(handle).new_tokens == 4 for handle in [first, *others])
    finally:
        engine.close()
    assert rows_per_step[0] == len(PROMPTS), rows_per_step
