"""The Compare tab's handler: two settings, one metered service, both streams read in turn and closed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from backend.errors import RateLimited
from backend.settings import GenerationSettings, ServerLimits
from ui.compare_tab import compare_replies, copied_values, interleaved, next_seed
from ui.handlers import metered_chat

LIMITS = ServerLimits(max_new_tokens=64)


def values(**overrides) -> dict:
    return {**GenerationSettings(max_new_tokens=8).to_dict(), "stop_words": "", **overrides}


def reply(text: str, seed: int, done: bool = False):
    return SimpleNamespace(
        text=text,
        done=done,
        queue_position=None,
        notice=None,
        stats_line=lambda: f"{len(text)} tokens · seed {seed}",
    )


class FakeStream:
    """A reply stream that records what its reader did."""

    def __init__(self, log: list, name: str, texts: list[str], seed: int, fail_after: int | None = None):
        self.log, self.name, self.seed = log, name, seed
        self.texts, self.fail_after, self.closed = texts, fail_after, False

    def __iter__(self):
        return self

    def __next__(self):
        if self.fail_after is not None and len([e for e in self.log if e == self.name]) == self.fail_after:
            raise RuntimeError(f"{self.name} broke")
        count = len([entry for entry in self.log if entry == self.name])
        if count == len(self.texts):
            raise StopIteration
        self.log.append(self.name)
        return reply(self.texts[count], self.seed, done=count == len(self.texts) - 1)

    def close(self):
        self.closed = True


class FakeService:
    holder = limits = stats = None  # what ChatDecorator (the rate limit's wrapper) copies

    def __init__(self, lengths=(3, 2), fail_after=(None, None)):
        self.log, self.calls, self.streams = [], [], []
        self.lengths, self.fail_after = lengths, fail_after

    def chat(self, message, history, settings):
        index = len(self.calls)
        self.calls.append((message, history, settings))
        name = "AB"[index]
        texts = [name.lower() * (n + 1) for n in range(self.lengths[index])]
        stream = FakeStream(self.log, name, texts, settings.seed, self.fail_after[index])
        self.streams.append(stream)
        return stream


def test_both_replies_stream_in_turn_with_their_own_settings():
    service = FakeService()
    updates = list(
        compare_replies(service, LIMITS, "Hi", [], (values(seed=5), values(seed=6, temperature=1.1)))
    )
    assert [settings.seed for _, _, settings in service.calls] == [5, 6]
    assert service.calls[1][2].temperature == 1.1
    assert service.log[:4] == ["A", "B", "A", "B"]  # read in turn, not one after the other
    head_a, head_b, text_a, text_b, stats_a, stats_b = updates[-1]
    assert (text_a, text_b) == ("aaa", "bb")
    assert stats_a == "3 tokens · seed 5" and stats_b == "2 tokens · seed 6"
    assert 'data-setting="temperature"' in head_a and 'data-setting="seed"' in head_b
    assert all(stream.closed for stream in service.streams)


def test_closing_the_handler_closes_both_streams():
    service = FakeService(lengths=(50, 50))
    updates = compare_replies(service, LIMITS, "Hi", [], (values(seed=1), values(seed=2)))
    for _ in range(4):
        next(updates)
    updates.close()  # what Gradio does on Stop
    assert [stream.closed for stream in service.streams] == [True, True]


def test_a_failing_side_says_why_and_the_other_carries_on():
    service = FakeService(lengths=(4, 4), fail_after=(None, 1))
    *_, last = compare_replies(service, LIMITS, "Hi", [], (values(seed=1), values(seed=2)))
    assert last[2] == "aaaa" and last[4].startswith("4 tokens")
    assert last[3] == "b" and "B broke" in last[5]


def test_bad_settings_on_either_side_refuse_before_anything_starts():
    service = FakeService()
    (only,) = list(compare_replies(service, LIMITS, "Hi", [], (values(), values(top_p=3.0))))
    assert "'top_p'" in only[4] and "'top_p'" in only[5]
    assert service.calls == []


def test_both_requests_pass_the_rate_limit_and_a_refusal_closes_the_first():
    admitted = []

    class Limit:
        def admit(self, request):
            if len(admitted) == 1:
                raise RateLimited(1, 30)
            admitted.append(request)

    service = FakeService()
    updates = list(
        compare_replies(metered_chat(service, Limit(), None), LIMITS, "Hi", [], (values(), values()))
    )
    assert len(admitted) == 1 and "Rate limit" in updates[-1][4]
    assert [stream.closed for stream in service.streams] == [True]


def test_the_chat_so_far_goes_to_both():
    service = FakeService()
    history = [{"role": "user", "content": "Earlier"}, {"role": "assistant", "content": "Reply"}]
    list(compare_replies(service, LIMITS, "Next", history, (values(), values())))
    assert [call[1][0].user for call in service.calls] == ["Earlier", "Earlier"]


def test_b_is_a_copy_of_a_with_the_next_seed():
    assert copied_values(values(seed=7, temperature=0.3)) == values(seed=8, temperature=0.3)
    assert next_seed(-1) == -1  # each side draws its own
    assert next_seed(2**32 - 1) == 0


@pytest.mark.parametrize("lengths", [(0, 2), (2, 0), (1, 3)])
def test_interleaved_reports_each_end(lengths):
    service = FakeService(lengths=lengths)
    streams = [service.chat("x", [], GenerationSettings()) for _ in range(2)]
    events = list(interleaved(streams))
    ends = [index for index, item, error in events if item is None and error is None]
    assert sorted(ends) == [0, 1]
    assert len(events) == sum(lengths) + 2


def test_two_real_requests_decode_together(demo_text_dir):
    from backend.models.holder import ModelHolder
    from backend.models.loading import ModelSpec
    from backend.services.chat import ChatService

    holder = ModelHolder(ModelSpec(str(demo_text_dir), dtype="float32"), fallback_to_demo=False)
    holder.load()
    service = ChatService(holder, LIMITS)
    updates = list(
        compare_replies(service, LIMITS, "Hello", [], (values(seed=3), values(seed=3, mode="greedy")))
    )
    _, _, text_a, text_b, stats_a, stats_b = updates[-1]
    assert text_a and text_b
    assert "seed 3" in stats_a and "sample" in stats_a and "greedy" in stats_b
    alone = list(service.chat("Hello", [], GenerationSettings(seed=3, max_new_tokens=8)))[-1].text
    assert text_a == alone  # the same seed gives the same text beside another request
    assert service.stats.snapshot().finished_requests == 3


def test_the_tab_counts_both_requests_against_the_rate_limit(demo_text_dir):
    """The page's wiring: Compare goes through the same metered service as the chat, one admit a side."""
    import gradio as gr

    from backend.models.holder import ModelHolder
    from backend.models.loading import ModelSpec
    from backend.services.chat import ChatService
    from ui.layout import build_ui

    admitted = []

    class Limit:
        def admit(self, request):
            admitted.append(request)

    holder = ModelHolder(ModelSpec(str(demo_text_dir), dtype="float32"), fallback_to_demo=False)
    holder.load()
    demo = build_ui(ChatService(holder, LIMITS), None, LIMITS, concurrency=2, rate_limit=Limit())
    compare = next(block for block in demo.fns.values() if getattr(block.fn, "__name__", "") == "on_compare")
    inputs = {component: getattr(component, "value", None) for component in compare.inputs}
    prompt = next(c for c in compare.inputs if getattr(c, "elem_id", None) == "compare-prompt")
    inputs[prompt] = "Hello"
    for component in compare.inputs:
        if isinstance(component, gr.Slider) and component.label == "Max new tokens":
            inputs[component] = 4
    *_, last = compare.fn(inputs)
    assert len(admitted) == 2
    assert "tok/s" in last[4] and "tok/s" in last[5]
