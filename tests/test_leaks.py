"""Once requests of every kind have ended and the engines are idle, nothing of any request stays reachable.

A per-request object kept alive by a queue, a list, a cache or a closure is how a server's memory creeps
for days; this catches that kind of leak without a clock: weak references and one garbage collection.
"""

from __future__ import annotations

import gc
import weakref

import pytest

import backend.decode.batch_cache as batch_cache
import backend.decode.engine as engine_module
import backend.decode.generation as generation
import backend.decode.requests as requests_module
import backend.replies as replies
from backend.errors import BadImage, BadInput
from backend.images import ImageLimits
from backend.models.holder import ModelHolder
from backend.models.loading import ModelSpec
from backend.models.vision_loading import load_vision_model
from backend.services.chat import ChatService
from backend.services.vision import VisionService
from backend.settings import GenerationSettings, ServerLimits
from tests.streams import wait_until_idle

# Every class a request makes an instance of, from the handle its caller holds to its KV buffers.
TRACKED = [
    (requests_module, "RequestHandle"),
    (engine_module, "_Pending"),
    (engine_module, "_Row"),
    (batch_cache, "RowKV"),
    (generation, "RequestState"),
    (replies, "ReplyStream"),
]


@pytest.fixture
def made(monkeypatch) -> list[weakref.ref]:
    """A weak reference to every tracked object made while the test runs."""
    refs: list[weakref.ref] = []
    for module, name in TRACKED:
        kind = getattr(module, name)
        original = kind.__init__

        def init(self, *args, _original=original, **kwargs):
            _original(self, *args, **kwargs)
            refs.append(weakref.ref(self))

        monkeypatch.setattr(kind, "__init__", init)
    return refs


def test_no_request_object_outlives_its_request(made, demo_text_dir, demo_vision_dirs, image_zoo):
    limits = ServerLimits(max_new_tokens=64)
    text = ModelHolder(ModelSpec(str(demo_text_dir), dtype="float32"), fallback_to_demo=False)
    vision = ModelHolder(
        ModelSpec(str(demo_vision_dirs["demo:tiny-llava"]), dtype="float32"), False, loader=load_vision_model
    )
    assert text.load().state == "ready" and vision.load().state == "ready"
    chat = ChatService(text, limits)
    images = VisionService(vision, chat, limits, ImageLimits())
    quick = GenerationSettings(seed=1, max_new_tokens=6)
    picture = str(image_zoo["good"]["picture.webp"])
    not_a_picture = str(image_zoo["bad"]["text.png"][0])

    list(chat.chat("Hello", [], quick))  # finished
    list(chat.complete("Once upon", GenerationSettings(seed=2, mode="beam", max_new_tokens=4)))  # beam
    stopped = chat.complete("Once upon a time", GenerationSettings(seed=3, max_new_tokens=60))
    next(iter(stopped))
    stopped.close()  # cancelled mid-reply
    del stopped
    with pytest.raises(BadInput):
        chat.chat("   ", [], quick)  # refused before it starts
    list(images.caption(picture, "", quick))  # through the vision model's engine
    with pytest.raises(BadImage):
        images.caption(not_a_picture, "", quick)  # a text file named .png
    reply = images.visual_chat("What is it?", picture, [], quick, "vision")
    list(reply.replies)
    del reply

    assert len(made) > 10  # the tracking saw the requests' objects
    for engines in (chat._engines, images._engines):
        wait_until_idle(engines._engine)
    gc.collect()
    alive = [ref() for ref in made if ref() is not None]
    kinds = sorted({type(o).__name__ for o in alive})
    assert not alive, f"still reachable after every request ended: {kinds}"
