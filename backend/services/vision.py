"""Images for the UI and API: captions, and visual chat by either of two pipelines.

- "vision": a LLaVA-style model answers about the images itself, multi-turn, every image kept in
  context in the turn that sent it.
- "caption": the vision model describes each image and the descriptions enter the text model's
  conversation, each in its turn, so the chat model (e.g. Vicuna) can talk about the pictures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

from backend.contracts import PIPELINES, ChatBackend, ModelSource, VisualReply
from backend.decode.engine import EngineLimits
from backend.decode.vision_replies import caption_stream, chat_with_image_stream, engine_model
from backend.errors import BadInput
from backend.images import ConversationImages, ImageLimits, load_image
from backend.models.vision_loading import LLAVA_FAMILIES
from backend.prompting import Turn, with_image_description
from backend.replies import Reply
from backend.services.model_engine import ModelEngine, RequestCounter
from backend.settings import GenerationSettings, ServerLimits
from backend.torch_threads import FreshThreadStream, call_on_fresh_thread

# Captions that feed the chat model are short and deterministic: the chat reply carries the sampling.
CAPTION_SETTINGS = GenerationSettings(mode="greedy", max_new_tokens=60, repetition_penalty=1.1)


class VisionService:
    takes_conversation_images = True  # visual_chat reads every image of a ConversationImages

    def __init__(
        self,
        holder: ModelSource,
        chat: ChatBackend,
        limits: ServerLimits,
        images: ImageLimits,
        engine_limits: EngineLimits | None = None,
    ):
        self.holder = holder
        self.chat = chat
        self.limits = limits
        self.image_limits = images
        # Replies still streaming hold the model: a switch waits for them (and the engine) to end.
        self.running = RequestCounter()
        self._engines = ModelEngine(holder, engine_limits or EngineLimits())
        holder.register_requests(lambda: self.running() + self._engines.pending(), self._engines.release)

    def family(self) -> str:
        return self.holder.get().family

    def caption(self, image_source, prompt: str, settings: GenerationSettings) -> Iterator[Reply]:
        """Caption the image, or answer `prompt` about it. Bad images raise here."""
        if not isinstance(prompt, str) or len(prompt) > self.limits.max_input_chars:
            raise BadInput(f"The prompt must be text of at most {self.limits.max_input_chars:,} characters.")
        image = load_image(image_source, self.image_limits)
        return self._stream(
            settings, lambda loaded, engine: caption_stream(loaded, image, prompt.strip(), settings, engine)
        )

    def _stream(self, settings: GenerationSettings, start: Callable[..., Iterator[Reply]]) -> Iterator[Reply]:
        """`start(loaded, engine)` with this model's batching engine where it has one.

        Torch work stays off the caller's lasting thread (backend.torch_threads): the image is encoded on a
        thread that ends and the engine decodes; without an engine the whole stream gets a thread.
        """
        loaded = self.holder.get()
        model = engine_model(loaded)
        if model is not None and settings.mode != "beam":
            engine = self._engines.get(loaded, model)
            return call_on_fresh_thread(start, loaded, engine)  # the engine counts it from here on
        # Counted from before its thread starts until that thread has stopped, however it stops.
        return FreshThreadStream(lambda: start(loaded, None), on_end=self.running.started())

    def choose_pipeline(self, requested: str) -> str:
        if requested not in PIPELINES:
            raise BadInput(f"Unknown image pipeline {requested!r}; choose one of {', '.join(PIPELINES)}.")
        if requested != "auto":
            return requested
        return "vision" if self.family() in LLAVA_FAMILIES else "caption"

    def visual_chat(
        self,
        message: str,
        image_source,
        history: list[Turn],
        settings: GenerationSettings,
        pipeline: str = "auto",
    ) -> VisualReply:
        """Answer `message` about the conversation's images.

        `image_source` is a ConversationImages (every image, in the turn that sent it; at most
        `image_limits.max_images`), or one image: the conversation's newest, as before.
        """
        chosen = self.choose_pipeline(pipeline)
        self.limits.check_text("Message", message)
        if isinstance(image_source, ConversationImages):
            images = image_source.loaded(len(history), self.image_limits)
        else:
            images = load_image(image_source, self.image_limits)
        if chosen == "vision":
            replies = self._stream(
                settings,
                lambda loaded, engine: chat_with_image_stream(
                    loaded, images, history, message, settings, engine
                ),
            )
            return VisualReply("vision", None, replies)
        if not isinstance(images, ConversationImages):
            images = ConversationImages.of([()] * len(history) + [(images,)])
        descriptions = [self.describe(turn_images) for turn_images in images.by_turn]
        turns = [
            Turn(with_image_description(description, turn.user), turn.assistant) if description else turn
            for description, turn in zip(descriptions, history, strict=False)
        ]
        new = descriptions[-1]
        text = with_image_description(new, message) if new else message
        return VisualReply("caption", new or None, self.chat.chat(text, turns, settings))

    def describe(self, images) -> str:
        """What the captioner says of one turn's decoded images: a caption, or "Image 1: …" lines in order."""
        captions = [self._caption_for_chat(image) for image in images]
        if len(captions) == 1:
            return captions[0]
        return "\n".join(f"Image {number}: {caption}" for number, caption in enumerate(captions, 1))

    def _caption_for_chat(self, image) -> str:
        caption_settings = replace(CAPTION_SETTINGS, seed=0)
        description = ""
        captions = self._stream(
            caption_settings,
            lambda loaded, engine: caption_stream(loaded, image, "", caption_settings, engine),
        )
        for reply in captions:
            description = reply.text
        return description if description.strip() else "(the captioning model returned no description)"
