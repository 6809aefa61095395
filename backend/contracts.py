"""What the UI and the /v1 edge call, and what they read back: Protocols and small frozen records.

Local models (services/ on models/) and a remote engine (remote/) both implement these, so the UI never
reaches into a loaded model and a remote engine never has to fake one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from backend.images import ImageLimits
from backend.model_status import LoadStatus, ModelInfo
from backend.prompting import Turn
from backend.replies import Reply
from backend.request_stats import RequestStats
from backend.settings import GenerationSettings, ServerLimits

# What a request with an image hears where images are off (the UI also says why, before anyone uploads).
IMAGES_OFF = (
    "Images are turned off on this server: it was started with --vision-model none, or the backend "
    "server behind it takes no images."
)
PIPELINES = ("auto", "vision", "caption")  # how an image reaches a chat: see services/vision.py


@dataclass(frozen=True)
class VisualReply:
    pipeline: str  # "vision" or "caption"
    caption: str | None  # "caption" pipeline: what the captioner said of the new message's images
    replies: Iterator[Reply]


def takes_conversation_images(vision: Any) -> bool:
    """Whether `vision.visual_chat` takes a ConversationImages (every image, each in its turn).

    Services without the attribute (remote.service's) take one image source: the conversation's newest.
    """
    return bool(getattr(vision, "takes_conversation_images", False))


class ModelSource(Protocol):
    """A model that loads in the background: models.holder.ModelHolder, or remote.service.RemoteHolder."""

    choices: Sequence[str]  # what `switch` takes

    @property
    def loaded_name(self) -> str: ...

    @property
    def is_demo(self) -> bool: ...

    def status(self) -> LoadStatus: ...

    def get(self) -> Any:
        """The loaded model, for the services; raises ModelNotReady while there is none."""
        ...

    def info(self) -> ModelInfo: ...

    def plan_report(self) -> dict | None:
        """The device plan as the System tab draws it; None without one."""
        ...

    def switch(self, name: str) -> None: ...


class ChatBackend(Protocol):
    """Chat, completion and the Inspector, streamed; bad input raises before the stream starts.

    `settings` come from the edge as `settings.request_settings` makes them: validated, with a concrete seed.
    """

    holder: ModelSource
    limits: ServerLimits
    stats: RequestStats

    @property
    def adapters(self) -> tuple[str, ...]: ...

    def queue_stats(self) -> tuple[int, int]:
        """(requests decoding, requests waiting) now."""
        ...

    def kv_usage(self) -> tuple[int, int | None] | None:
        """(KV tokens held by running requests, the budget or None); None where nothing is known."""
        ...

    def decode_path(self) -> str | None:
        """Which decode step runs (backend.decode.fused_step), in words; None where no engine runs here."""
        ...

    def chat(self, message: str, history: list[Turn], settings: GenerationSettings) -> Iterator[Reply]: ...

    def complete(self, text: str, settings: GenerationSettings) -> Iterator[Reply]: ...

    def next_tokens(self, text: str, settings: GenerationSettings, n: int) -> Any: ...

    def step_text(self, text: str, settings: GenerationSettings) -> str: ...

    def chat_context(self, history: list[Turn], system_prompt: str) -> str: ...


class VisionBackend(Protocol):
    """Captions and visual chat; bad images and settings raise before the stream starts.

    `visual_chat`'s `image_source` is one image, or a backend.images.ConversationImages where
    `takes_conversation_images(service)` says so.
    """

    holder: ModelSource
    image_limits: ImageLimits

    def caption(self, image_source: Any, prompt: str, settings: GenerationSettings) -> Iterator[Reply]: ...

    def choose_pipeline(self, requested: str) -> str: ...

    def visual_chat(
        self,
        message: str,
        image_source: Any,
        history: list[Turn],
        settings: GenerationSettings,
        pipeline: str = "auto",
    ) -> VisualReply: ...


class ChatDecorator:
    """A ChatBackend that passes every member on to `service`; decorators override what they add to."""

    def __init__(self, service: ChatBackend):
        self.service = service
        self.holder, self.limits, self.stats = service.holder, service.limits, service.stats

    @property
    def adapters(self) -> tuple[str, ...]:
        return self.service.adapters

    def queue_stats(self) -> tuple[int, int]:
        return self.service.queue_stats()

    def kv_usage(self) -> tuple[int, int | None] | None:
        return self.service.kv_usage()

    def decode_path(self) -> str | None:
        return self.service.decode_path()

    def chat(self, message: str, history: list[Turn], settings: GenerationSettings) -> Iterator[Reply]:
        return self.service.chat(message, history, settings)

    def complete(self, text: str, settings: GenerationSettings) -> Iterator[Reply]:
        return self.service.complete(text, settings)

    def next_tokens(self, text: str, settings: GenerationSettings, n: int) -> Any:
        return self.service.next_tokens(text, settings, n)

    def step_text(self, text: str, settings: GenerationSettings) -> str:
        return self.service.step_text(text, settings)

    def append_token(self, text: str, token_id: int) -> str:
        """Local services only (ChatService): a remote engine's listed tokens have no ids (-1)."""
        return self.service.append_token(text, token_id)

    def chat_context(self, history: list[Turn], system_prompt: str) -> str:
        return self.service.chat_context(history, system_prompt)


class VisionDecorator:
    """A VisionBackend that passes every member on to `service`; decorators override what they add to."""

    def __init__(self, service: VisionBackend):
        self.service = service
        self.holder, self.image_limits = service.holder, service.image_limits

    @property
    def takes_conversation_images(self) -> bool:
        return takes_conversation_images(self.service)

    def choose_pipeline(self, requested: str) -> str:
        return self.service.choose_pipeline(requested)

    def caption(self, image_source: Any, prompt: str, settings: GenerationSettings) -> Iterator[Reply]:
        return self.service.caption(image_source, prompt, settings)

    def visual_chat(
        self,
        message: str,
        image_source: Any,
        history: list[Turn],
        settings: GenerationSettings,
        pipeline="auto",
    ) -> VisualReply:
        return self.service.visual_chat(message, image_source, history, settings, pipeline)
