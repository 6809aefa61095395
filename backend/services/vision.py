"""Images for the UI and API: captions, and visual chat by either of two pipelines.

- "vision": a LLaVA-style model answers about the image itself, multi-turn, image kept in context.
- "caption": the vision model describes the image and the description enters the text model's
  conversation as context, so the chat model (e.g. Vicuna) can talk about the picture.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

from backend.contracts import PIPELINES, ChatBackend, ModelSource, VisualReply
from backend.decode.engine import EngineLimits
from backend.decode.vision_replies import caption_stream, chat_with_image_stream, engine_model
from backend.errors import BadInput
from backend.images import ImageLimits, load_image
from backend.models.vision_loading import LLAVA_FAMILIES
from backend.prompting import Turn, with_image_description
from backend.replies import Reply
from backend.services.model_engine import ModelEngine, RequestCounter
from backend.settings import GenerationSettings, ServerLimits
from backend.torch_threads import FreshThreadStream, call_on_fresh_thread

# Captions that feed the chat model are short and deterministic: the chat reply carries the sampling.
CAPTION_SETTINGS = GenerationSettings(mode="greedy", max_new_tokens=60, repetition_penalty=1.1)


class VisionService:
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
        """Answer `message` about the image (the newest one in the conversation)."""
        chosen = self.choose_pipeline(pipeline)
        self.limits.check_text("Message", message)
        image = load_image(image_source, self.image_limits)
        if chosen == "vision":
            replies = self._stream(
                settings,
                lambda loaded, engine: chat_with_image_stream(
                    loaded, image, history, message, settings, engine
                ),
            )
            return VisualReply("vision", None, replies)
        caption_settings = replace(CAPTION_SETTINGS, seed=0)
        description = ""
        captions = self._stream(
            caption_settings,
            lambda loaded, engine: caption_stream(loaded, image, "", caption_settings, engine),
        )
        for reply in captions:
            description = reply.text
        if not description.strip():
            description = "(the captioning model returned no description)"
        replies = self.chat.chat(with_image_description(description, message), history, settings)
        return VisualReply("caption", description, replies)
