"""Images end to end below the UI: every upload kind, both visual-chat pipelines, the chat handler."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from backend.contracts import VisionDecorator
from backend.errors import BadImage, BadInput
from backend.images import ConversationImages, ImageLimits, load_image
from backend.models.holder import ModelHolder
from backend.models.loading import ModelSpec
from backend.models.vision_loading import load_vision_model
from backend.prompting import Turn
from backend.services.chat import ChatService
from backend.services.vision import VisionService
from backend.settings import GenerationSettings, ServerLimits
from tests import streams as stream_helpers
from tests.streams import HANG, last_items_together, no_early_end
from ui.handlers import regenerate
from ui.messages import caption_note, history_to_turns, image_paths, is_caption_note, note
from ui.visual_chat import ANSWERED_BY, images_by_turn, needs_vision_model, visual_turn

watch_forwards = stream_helpers.watch_forwards  # a fixture: tests ask for it by name

LIMITS = ServerLimits(max_new_tokens=64)
QUICK = GenerationSettings(seed=3, max_new_tokens=6)


def make_service(text_dir, vision_dir) -> VisionService:
    text = ModelHolder(ModelSpec(str(text_dir), dtype="float32"), fallback_to_demo=False)
    vision = ModelHolder(ModelSpec(str(vision_dir), dtype="float32"), False, loader=load_vision_model)
    assert text.load().state == "ready" and vision.load().state == "ready"
    return VisionService(vision, ChatService(text, LIMITS), LIMITS, ImageLimits())


@pytest.fixture(scope="module")
def llava(demo_text_dir, demo_vision_dirs):
    return make_service(demo_text_dir, demo_vision_dirs["demo:tiny-llava"])


@pytest.fixture(scope="module")
def blip2(demo_text_dir, demo_vision_dirs):
    return make_service(demo_text_dir, demo_vision_dirs["demo:tiny-blip2"])


def test_every_good_upload_gets_a_caption(llava, image_zoo):
    for name, path in image_zoo["good"].items():
        replies = list(llava.caption(str(path), "", QUICK))
        assert replies[-1].done and replies[-1].new_tokens > 0, name


def test_every_bad_upload_gets_a_clear_refusal(llava, image_zoo):
    for path, words in image_zoo["bad"].values():
        with pytest.raises(BadImage, match=words):
            llava.caption(str(path), "", QUICK)
    assert list(llava.caption(str(image_zoo["good"]["picture.bmp"]), "", QUICK))  # still serving


def test_caption_is_reproducible_and_depends_on_the_image(blip2, image_zoo):
    house, gray = str(image_zoo["good"]["picture.webp"]), str(image_zoo["good"]["grayscale.png"])
    greedy = GenerationSettings(seed=0, mode="greedy", max_new_tokens=12)
    first = list(blip2.caption(house, "", greedy))[-1].text
    assert first == list(blip2.caption(house, "", greedy))[-1].text
    assert first != list(blip2.caption(gray, "", greedy))[-1].text


def test_auto_pipeline_follows_the_model_family(llava, blip2):
    assert llava.choose_pipeline("auto") == "vision"
    assert blip2.choose_pipeline("auto") == "caption"
    with pytest.raises(BadInput, match="Unknown image pipeline"):
        llava.choose_pipeline("telepathy")


def test_caption_pipeline_puts_the_description_into_the_chat(blip2, image_zoo):
    path = str(image_zoo["good"]["picture.webp"])
    values = {**QUICK.to_dict(), "stop_words": ""}
    updates = list(visual_turn(blip2, LIMITS, "What is it?", [path], [], values, "auto"))
    _, history, _ = updates[-1]
    assert image_paths(history[0]["content"]) == [path]
    caption = next(m for m in history if is_caption_note(m))
    assert "image captioned for the chat model" in history[-1]["metadata"]["title"]
    turns = history_to_turns(history)
    assert turns[0].user.startswith("[Image description: ") and turns[0].user.endswith("What is it?")
    assert caption["content"].strip() in turns[0].user
    # A follow-up without an image goes to the text model, with the description still in context.
    assert not needs_vision_model(blip2, history, [], "auto")


def test_vision_pipeline_keeps_the_image_for_later_turns(llava, image_zoo):
    path = str(image_zoo["good"]["picture.bmp"])
    values = {**QUICK.to_dict(), "stop_words": ""}
    _, history, _ = list(visual_turn(llava, LIMITS, "What is it?", [path], [], values, "auto"))[-1]
    assert "answered by the vision model" in history[-1]["metadata"]["title"]
    assert needs_vision_model(llava, history, [], "auto")
    _, later, _ = list(visual_turn(llava, LIMITS, "And now?", [], history, values, "auto"))[-1]
    assert len(history_to_turns(later)) == 2


def test_visual_turn_refusals_keep_the_conversation(llava, image_zoo):
    path, _ = image_zoo["bad"]["bomb.png"]
    before = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    values = {**QUICK.to_dict(), "stop_words": ""}
    box, history, _ = list(visual_turn(llava, LIMITS, "look", [str(path)], list(before), values, "auto"))[-1]
    assert box == "look" and history[:2] == before and "megapixels" in history[-1]["metadata"]["title"]
    box, history, _ = list(visual_turn(None, LIMITS, "look", [str(path)], list(before), values, "auto"))[-1]
    assert "Images are turned off" in history[-1]["metadata"]["title"]


def test_image_streams_run_on_threads_that_end(llava, blip2, image_zoo, monkeypatch):
    """Preprocessing and decoding leave the request thread: a lasting one would keep an OpenMP team."""
    import backend.services.vision as vision_service

    ran_on = []
    for name in ("caption_stream", "chat_with_image_stream"):
        original = getattr(vision_service, name)

        def recording(*args, _original=original, **kwargs):
            ran_on.append(threading.current_thread())
            return _original(*args, **kwargs)

        monkeypatch.setattr(vision_service, name, recording)
    image = next(iter(image_zoo["good"].values()))
    list(llava.caption(image, "", QUICK))
    list(llava.visual_chat("What is this?", image, [], QUICK, pipeline="vision").replies)
    list(blip2.visual_chat("What is this?", image, [], QUICK, pipeline="caption").replies)
    stream = llava.caption(image, "", GenerationSettings(seed=3, max_new_tokens=40))
    next(stream)
    stream.close()
    assert len(ran_on) == 4
    for thread in ran_on:
        thread.join(HANG)
        assert thread is not threading.current_thread() and not thread.is_alive()


@pytest.mark.parametrize("name", ["llava", "blip2"])
def test_overlapping_image_requests_share_the_engine_and_get_what_they_get_alone(
    name, request, image_zoo, monkeypatch, watch_forwards
):
    """Image requests join one batch (prefill alone with the image, then decode together)."""
    from backend.decode.vision_replies import caption_stream, engine_model
    from backend.images import load_image

    service = request.getfixturevalue(name)
    loaded = service.holder.get()
    images = [str(path) for path in list(image_zoo["good"].values())[:3]]
    jobs = [
        (images[0], "", GenerationSettings(seed=11, max_new_tokens=12, temperature=0.9)),
        (images[1], "What is it?", GenerationSettings(seed=0, mode="greedy", max_new_tokens=9)),
        (images[2], "", GenerationSettings(seed=5, max_new_tokens=12, top_k=5, repetition_penalty=1.2)),
    ]
    decoder = engine_model(loaded)
    # The engine's first decode step waits until all three are queued.
    forwards = watch_forwards(decoder, hold_at=1)
    streams = [service.caption(image, prompt, settings) for image, prompt, settings in jobs]  # each queued
    forwards.go_on.set()
    results = last_items_together(streams)
    together = forwards.calls()
    for (image, prompt, settings), result in zip(jobs, results, strict=True):
        alone = list(caption_stream(loaded, load_image(image), prompt, settings))[-1]  # on this thread
        assert (result.text, result.new_tokens) == (alone.text, alone.new_tokens), (name, prompt)
    one_at_a_time = forwards.calls(threading.current_thread().name)
    assert together < one_at_a_time  # fewer forward passes than one at a time


@pytest.mark.parametrize("name", ["llava", "blip2"])
def test_an_image_request_gets_the_same_bits_in_the_vision_batch_as_alone(
    request, name, image_zoo, monkeypatch
):
    """Seeds hold for images too: each caption's first-step logits and tokens, alone and three at once."""
    from tests.test_batch_invariance import Recorder

    service = request.getfixturevalue(name)
    no_early_end(monkeypatch)
    recorder = Recorder(monkeypatch)
    images = [str(path) for path in list(image_zoo["good"].values())[:3]]
    sampled = dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=8)
    jobs = [(image, "", GenerationSettings(seed=1000 + i, **sampled)) for i, image in enumerate(images)]
    for image, prompt, settings in jobs:
        list(service.caption(image, prompt, settings))  # alone, through the same engine
    reference = {index: recorder.of(index) for index in range(len(jobs))}
    recorder.first_logits.clear()
    forwards = watch_forwards_for(service, monkeypatch)
    streams = [service.caption(image, prompt, settings) for image, prompt, settings in jobs]
    forwards.go_on.set()
    last_items_together(streams)
    assert max(forwards.steps()) > 1  # they did decode together
    for index, (logits, tokens) in reference.items():
        batched_logits, batched_tokens = recorder.of(index)
        assert batched_tokens == tokens and torch.equal(batched_logits, logits), (name, index)


def watch_forwards_for(service, monkeypatch):
    """Hold the vision engine's first decode step until every request is queued (see tests.streams)."""
    from backend.decode.vision_replies import engine_model

    decoder = engine_model(service.holder.get())
    forwards = stream_helpers.Forwards(decoder, hold_at=1, stats=lambda: service._engines._engine.stats())
    monkeypatch.setattr(decoder, "forward", forwards)
    return forwards


# ----------------------------------------------------------------------------- several images

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
HOUSE, SMILEY = str(EXAMPLES / "house.png"), str(EXAMPLES / "smiley.jpg")
# Greedy: the reply is a function of the prompt and the images alone.
GREEDY = GenerationSettings(seed=0, mode="greedy", repetition_penalty=1.0, max_new_tokens=12)
QUESTION = "What is in the pictures?"


def ask(service, by_turn, history=(), pipeline="vision"):
    """(final reply, the VisualReply) for `by_turn` images (ConversationImages.of) and QUESTION."""
    result = service.visual_chat(QUESTION, ConversationImages.of(by_turn), list(history), GREEDY, pipeline)
    return list(result.replies)[-1], result


def test_two_images_in_one_message_are_read_in_order(llava):
    both, _ = ask(llava, [(HOUSE, SMILEY)])
    texts = {
        "reversed": ask(llava, [(SMILEY, HOUSE)])[0].text,
        "house alone": ask(llava, [(HOUSE,)])[0].text,
        "smiley alone": ask(llava, [(SMILEY,)])[0].text,
    }
    assert both.text and all(text != both.text for text in texts.values()), (both.text, texts)
    # Each image's tokens count (the demo's are 16, and "\n" after each).
    assert both.prompt_tokens - ask(llava, [(HOUSE,)])[0].prompt_tokens == 16 + 1


def test_images_of_earlier_turns_stay_where_they_were_sent(llava):
    history = [Turn("What is it?", "A thing.")]
    placed, _ = ask(llava, [(HOUSE,), (SMILEY,)], history)
    assert placed.text != ask(llava, [(), (HOUSE, SMILEY)], history)[0].text
    assert placed.text != ask(llava, [(), (SMILEY,)], history)[0].text


def test_caption_pipeline_describes_each_image_in_its_turn(blip2, monkeypatch):
    house, smiley = (blip2.describe([load_image(path)]) for path in (HOUSE, SMILEY))
    assert house != smiley
    _, result = ask(blip2, [(HOUSE, SMILEY)], pipeline="caption")
    assert result.caption == f"Image 1: {house}\nImage 2: {smiley}"
    _, result = ask(blip2, [(SMILEY, HOUSE)], pipeline="caption")
    assert result.caption == f"Image 1: {smiley}\nImage 2: {house}"
    sent = []
    chat = blip2.chat.chat
    monkeypatch.setattr(blip2.chat, "chat", lambda *args: sent.append(args) or chat(*args))
    history = [Turn("What is it?", "A thing.")]
    _, result = ask(blip2, [(HOUSE,), (SMILEY,)], history, pipeline="caption")
    message, turns, _ = sent[-1]
    assert turns == [Turn(f"[Image description: {house}]\nWhat is it?", "A thing.")]
    assert message == f"[Image description: {smiley}]\n{QUESTION}" and result.caption == smiley


def test_too_many_images_or_misplaced_ones_are_refused_naming_the_limit(llava, blip2):
    nine = ConversationImages.of([(HOUSE,) * 9])
    for service, pipeline in ((llava, "vision"), (blip2, "caption")):
        with pytest.raises(BadInput, match="has 9 images; the limit is 8 images per request"):
            service.visual_chat(QUESTION, nine, [], GREEDY, pipeline)
    with pytest.raises(BadInput, match="given for 1 user turns; the conversation has 2"):
        llava.visual_chat(QUESTION, ConversationImages.of([(HOUSE,)]), [Turn("a", "b")], GREEDY)
    with pytest.raises(BadImage, match="No image was given"):
        llava.visual_chat(QUESTION, ConversationImages.of([()]), [], GREEDY)


class Recording(VisionDecorator):
    """Records what each visual_chat was given; `several=False` acts as a service that takes one image."""

    def __init__(self, service, several=True):
        super().__init__(service)
        self.several, self.calls = several, []

    @property
    def takes_conversation_images(self) -> bool:
        return self.several

    def visual_chat(self, message, image_source, history, settings, pipeline="auto"):
        self.calls.append((image_source, history))
        return super().visual_chat(message, image_source, history, settings, pipeline)


def test_the_chat_sends_every_image_of_the_conversation_in_its_turn(llava, blip2, image_zoo):
    values = {**QUICK.to_dict(), "stop_words": ""}
    vision = Recording(llava)
    _, history, _ = list(visual_turn(vision, LIMITS, "Compare", [HOUSE, SMILEY], [], values, "auto"))[-1]
    assert [image_paths(m["content"]) for m in history[:2]] == [[HOUSE], [SMILEY]]  # both shown, in order
    later = str(image_zoo["good"]["picture.bmp"])
    _, history, _ = list(visual_turn(vision, LIMITS, "And this?", [later], history, values, "auto"))[-1]
    list(visual_turn(vision, LIMITS, "Which was first?", [], history, values, "auto"))
    assert [call[0].by_turn for call in vision.calls] == [
        ((HOUSE, SMILEY),),
        ((HOUSE, SMILEY), (later,)),
        ((HOUSE, SMILEY), (later,), ()),
    ]
    assert [len(turns) for _, turns in vision.calls] == [0, 1, 2]
    # The captioner gets the new images only: the history holds the earlier descriptions.
    captioner = Recording(blip2)
    _, history, _ = list(visual_turn(captioner, LIMITS, "Compare", [HOUSE, SMILEY], [], values, "auto"))[-1]
    list(visual_turn(captioner, LIMITS, "And this?", [later], history, values, "auto"))
    assert [call[0].by_turn for call in captioner.calls] == [((HOUSE, SMILEY),), ((), (later,))]


def test_images_by_turn_follows_history_to_turns():
    def user(content):
        return {"role": "user", "content": content}

    history = [
        user({"path": "a.png"}),
        user("first"),
        caption_note("What it sees", "a cat"),
        {"role": "assistant", "content": "A cat."},
        note("12 tokens · 3 tok/s"),
        user("no image"),
        {"role": "assistant", "content": "Fine."},
        user({"path": "b.png"}),
        user([{"type": "file", "file": {"path": "c.png"}}]),
        user("unanswered"),
        note("⚠️ failed"),
    ]
    assert len(history_to_turns(history)) == 2
    assert images_by_turn(history) == [("a.png",), (), ("b.png", "c.png")]


def test_a_one_image_vision_service_gets_the_newest_image_and_refuses_several(llava):
    values = {**QUICK.to_dict(), "stop_words": ""}
    one_image = Recording(llava, several=False)  # as remote.service's RemoteVisionService
    _, history, _ = list(visual_turn(one_image, LIMITS, "What?", [HOUSE], [], values, "auto"))[-1]
    list(visual_turn(one_image, LIMITS, "And?", [], history, values, "auto"))
    assert [call[0] for call in one_image.calls] == [HOUSE, HOUSE]
    _, refused, _ = list(visual_turn(one_image, LIMITS, "Both?", [HOUSE, SMILEY], [], values, "auto"))[-1]
    assert "reads one image per message" in refused[-1]["metadata"]["title"]


def test_a_retried_or_edited_image_turn_goes_again_with_its_images_to_the_model_that_read_them(llava, blip2):
    """Retry and edit send a turn's images again, to the vision model or the captioner as on_chat would,
    instead of the text alone to the chat model."""
    values = {**QUICK.to_dict(), "stop_words": ""}
    for service, answered in ((llava, ANSWERED_BY["vision"]), (blip2, ANSWERED_BY["caption"])):
        vision = Recording(service)

        def visual(text, files, before, vision=vision):
            if not needs_vision_model(vision, before, files, "auto"):
                return None
            return visual_turn(vision, LIMITS, text, files, before, values, "auto")

        _, history, _ = list(visual_turn(vision, LIMITS, "Compare", [HOUSE, SMILEY], [], values, "auto"))[-1]
        reply = len(history) - 2  # the reply, before its numbers line
        for new_text in (None, "Which is brighter?"):
            calls = len(vision.calls)
            turns = regenerate(service.chat, LIMITS, history, reply, values, new_text=new_text, visual=visual)
            _, again, _ = list(turns)[-1]
            assert [image_paths(m["content"]) for m in again[:2]] == [[HOUSE], [SMILEY]], answered
            assert again[2]["content"] == (new_text or "Compare")
            assert answered in again[-1]["metadata"]["title"]
            assert len(vision.calls) == calls + 1 and vision.calls[-1][0].by_turn[-1] == (HOUSE, SMILEY)
