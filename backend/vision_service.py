"""Images for the UI and API: captions, and visual chat by either of two pipelines.

- "vision": a LLaVA-style model answers about the image itself, multi-turn, image kept in context.
- "caption": the vision model describes the image and the description enters the text model's
  conversation as context, so the chat model (e.g. Vicuna) can talk about the picture.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

from backend.chat_service import ChatService
from backend.errors import BadInput
from backend.images import ImageLimits, load_image
from backend.model_holder import ModelHolder, RequestCounter
from backend.prompting import Turn, with_image_description
from backend.replies import Reply
from backend.settings import GenerationSettings, ServerLimits
from backend.torch_threads import FreshThreadStream
from backend.vision import LLAVA_FAMILIES, caption_stream, chat_with_image_stream

PIPELINES = ("auto", "vision", "caption")
# Captions that feed the chat model are short and deterministic: the chat reply carries the sampling.
CAPTION_SETTINGS = GenerationSettings(mode="greedy", max_new_tokens=60, repetition_penalty=1.1)


@dataclass(frozen=True)
class VisualReply:
    pipeline: str  # "vision" or "caption"
    caption: str | None  # what the captioner said, for the "caption" pipeline
    replies: Iterator[Reply]


class VisionService:
    def __init__(self, holder: ModelHolder, chat: ChatService, limits: ServerLimits, images: ImageLimits):
        self.holder = holder
        self.chat = chat
        self.limits = limits
        self.image_limits = images
        # Streams run on threads of their own, each holding the model: a switch waits for them to end.
        self.running = RequestCounter()
        holder.register_requests(self.running, lambda reason: None)

    def family(self) -> str:
        return self.holder.get().family

    def caption(self, image_source, prompt: str, settings: GenerationSettings) -> Iterator[Reply]:
        """Caption the image, or answer `prompt` about it. Bad images and settings raise here."""
        settings = settings.validated(self.limits)
        if not isinstance(prompt, str) or len(prompt) > self.limits.max_input_chars:
            raise BadInput(f"The prompt must be text of at most {self.limits.max_input_chars:,} characters.")
        image = load_image(image_source, self.image_limits)
        loaded = self.holder.get()
        return self.running.track(
            FreshThreadStream(lambda: caption_stream(loaded, image, prompt.strip(), settings))
        )

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
        settings = settings.validated(self.limits)
        self.limits.check_text("Message", message)
        image = load_image(image_source, self.image_limits)
        if chosen == "vision":
            loaded = self.holder.get()
            replies = FreshThreadStream(
                lambda: chat_with_image_stream(loaded, image, history, message, settings)
            )
            return VisualReply("vision", None, self.running.track(replies))
        caption_settings = replace(CAPTION_SETTINGS, seed=0)
        description = ""
        loaded = self.holder.get()
        captions = FreshThreadStream(lambda: caption_stream(loaded, image, "", caption_settings))
        for reply in self.running.track(captions):
            description = reply.text
        if not description.strip():
            description = "(the captioning model returned no description)"
        replies = self.chat.chat(with_image_description(description, message), history, settings)
        return VisualReply("caption", description, replies)
