"""Remote mode: an OpenAI-compatible server (vLLM, SGLang, another playground) answers, not local models.

RemoteChatService and RemoteVisionService have the public interface of ChatService and VisionService,
so the UI and the /v1 API use them unchanged; RemoteHolder stands in for ModelHolder (banner, System
tab), and backend.remote.capabilities says which of our settings the server takes. Closing a reply
stream hangs up on the server, which cancels the generation there.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

from PIL import Image

from backend.contracts import PIPELINES, VisualReply
from backend.errors import BackendError, BadInput, InvalidSettings, ModelNotReady, UserError
from backend.images import ConversationImages, ImageLimits, load_image
from backend.model_status import LoadStatus, ModelInfo
from backend.prompting import Turn, chat_messages
from backend.remote.capabilities import UNKNOWN_SERVER, RemoteCapabilities, sampling_payload
from backend.remote.client import OpenAIClient
from backend.remote.logprobs import (
    COMPLETION_TOKENS,
    INSPECTOR_TOKENS,
    logprob_params,
    next_tokens_from,
    tokens_of,
)
from backend.replies import Reply, ReplyStream
from backend.request_stats import RequestStats
from backend.settings import GenerationSettings, ServerLimits
from backend.token_probs import NextTokens

log = logging.getLogger(__name__)

IMAGE_QUESTION = "Describe the image."
RETRY_SECONDS = 5.0
NO_TEMPLATE = (
    "'Use the chat' needs the model's chat template, which the backend server applies itself and does "
    "not give out; paste the text into the Inspector instead."
)


@dataclass(frozen=True)
class RemoteModel:
    """The model a backend server serves, as its /v1/models card describes it."""

    name: str
    path: str  # the server's URL
    context_window: int | str
    load_seconds: float
    capabilities: RemoteCapabilities
    notes: tuple[str, ...] = ()


class RemoteHolder:
    """Like ModelHolder: `load()` asks the server for its model; `get()` retries while it is unreachable."""

    def __init__(self, client: OpenAIClient, preferred_model: str | None = None):
        self.client = client
        self.preferred_model = preferred_model
        self._status = LoadStatus("loading", f"Connecting to {client.base}")
        self._model: RemoteModel | None = None
        self._tried_at = float("-inf")
        self._lock = threading.Lock()

    choices: tuple[str, ...] = ()  # the backend server chooses its model

    def status(self) -> LoadStatus:
        return self._status

    def info(self) -> ModelInfo:
        model = self.get()
        return ModelInfo(
            name=model.name,
            location=model.path,
            quantization="chosen by the backend server",
            dtype="chosen by the backend server",
            context_window=model.context_window,
            load_seconds=model.load_seconds,
            places=(f"the backend server at {model.path}",),
            notes=model.notes,
        )

    def plan_report(self) -> None:
        return None  # the backend server places its model itself

    def switch(self, name: str) -> None:
        raise BadInput("The backend server chooses its model; restart with another --model to ask for one.")

    @property
    def is_demo(self) -> bool:
        return False

    @property
    def loaded_name(self) -> str:
        return self._model.name if self._model else (self.preferred_model or "remote model")

    @property
    def capabilities(self) -> RemoteCapabilities:
        return self._model.capabilities if self._model else UNKNOWN_SERVER

    def get(self) -> RemoteModel:
        if self._model is None and time.monotonic() - self._tried_at > RETRY_SECONDS:
            self.load()
        if self._model is None:
            raise ModelNotReady(self._status.stage)
        return self._model

    def load(self) -> LoadStatus:
        """Never raises: a server that cannot be reached leaves the status "failed" with the reason."""
        with self._lock:
            self._tried_at = started = time.monotonic()
            try:
                cards = [card for card in self.client.get_json("/models")["data"] if isinstance(card, dict)]
                if not cards:
                    raise BackendError("it lists no models")
                card = next((c for c in cards if c.get("id") == self.preferred_model), cards[0])
                capabilities = RemoteCapabilities.from_model_card(card)
                self._model = RemoteModel(
                    name=str(card["id"]),
                    path=self.client.base,
                    context_window=card.get("max_model_len") or "unknown",
                    load_seconds=time.monotonic() - started,
                    capabilities=capabilities,
                    notes=tuple(sorted(set(capabilities.unsupported().values()))),
                )
                self._status = LoadStatus("ready", f"Ready: {card['id']} at {self.client.base}")
            except (UserError, BackendError, KeyError, TypeError) as error:
                log.warning("Backend server %s: %s", self.client.base, error)
                self._status = LoadStatus(
                    "failed", f"Cannot use the backend server {self.client.base}: {error}"
                )
        return self._status


class RemoteChatService:
    """ChatService's public interface over an OpenAI-compatible server."""

    def __init__(self, holder: RemoteHolder, limits: ServerLimits, stats: RequestStats | None = None):
        self.holder = holder
        self.client = holder.client
        self.limits = limits
        self.stats = stats or RequestStats()

    def queue_stats(self) -> tuple[int, int]:
        return self.stats.snapshot().active_requests, 0  # the backend server queues out of our sight

    def kv_usage(self) -> None:
        return None  # the backend server keeps its KV cache to itself

    def decode_path(self) -> None:
        return None  # the backend server decodes out of our sight

    def chat(self, message: str, history: list[Turn], settings: GenerationSettings) -> Iterator[Reply]:
        self.limits.check_text("Message", message)
        messages = chat_messages(settings.system_prompt, history, message.strip())
        return self._run("/chat/completions", {"messages": messages}, settings, chat=True)

    def complete(self, text: str, settings: GenerationSettings) -> Iterator[Reply]:
        self.limits.check_text("Text", text)
        return self._run("/completions", {"prompt": text}, settings, chat=False)

    def image_chat(
        self,
        message: str,
        images: ConversationImages,
        history: list[Turn],
        settings: GenerationSettings,
        pipeline: str,
    ) -> Iterator[Reply]:
        """`message` with every image (already checked and decoded) in the user turn that sent it,
        before its text, each inline as a data: URL."""
        messages = chat_messages(settings.system_prompt, history, message.strip())
        users = [entry for entry in messages if entry["role"] == "user"]
        for entry, turn_images in zip(users, images.by_turn, strict=True):
            if turn_images:
                urls = [
                    "data:image/png;base64," + base64.b64encode(png_bytes(i)).decode("ascii")
                    for i in turn_images
                ]
                parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
                entry["content"] = [*parts, {"type": "text", "text": entry["content"]}]
        extra = (
            {"image_pipeline": pipeline} if "image_pipeline" in self.holder.capabilities.extensions else {}
        )
        return self._run("/chat/completions", {"messages": messages, **extra}, settings, chat=True)

    def next_tokens(self, text: str, settings: GenerationSettings, n: int) -> NextTokens:
        """The Inspector from the server's top log-probabilities of the one next token (labelled so)."""
        self.limits.check_text("Text", text)
        model = self.holder.get()
        payload = {"model": model.name, "prompt": text, "max_tokens": 1, "temperature": 0.0}
        try:
            result = self.client.post_json("/completions", {**payload, "logprobs": min(n, INSPECTOR_TOKENS)})
        except BadInput as error:  # a server held to OpenAI's limit for completions (ours is)
            if "logprobs" not in str(error):
                raise
            result = self.client.post_json("/completions", {**payload, "logprobs": min(n, COMPLETION_TOKENS)})
        choice = (result.get("choices") or [{}])[0]
        tops = (choice.get("logprobs") or {}).get("top_logprobs") or [None]
        if not isinstance(tops[0], dict) or not tops[0]:
            raise BadInput(f"The backend server ({model.capabilities.server}) gave no log-probabilities.")
        return next_tokens_from(tops[0], settings, n)

    def step_text(self, text: str, settings: GenerationSettings) -> str:
        """`text` plus the one token the server draws next with these settings and seed."""
        self.limits.check_text("Text", text)
        model = self.holder.get()
        payload, _ = sampling_payload(replace(settings, max_new_tokens=1), model.capabilities)
        result = self.client.post_json("/completions", {**payload, "model": model.name, "prompt": text})
        return text + str(((result.get("choices") or [{}])[0]).get("text") or "")

    def chat_context(self, history: list[Turn], system_prompt: str) -> str:
        raise BadInput(NO_TEMPLATE)

    def _run(self, path: str, body: dict, settings: GenerationSettings, chat: bool) -> Iterator[Reply]:
        """Send now, so that a refusal raises before the caller shows anything; stream the rest."""
        if settings.adapter:
            raise InvalidSettings("adapter", "adapters are only served by local models, not --backend-url")
        model = self.holder.get()
        payload, left_out = sampling_payload(settings, model.capabilities)
        notice = None
        if left_out:
            server = model.capabilities.server
            notice = f"Not applied ({', '.join(left_out)}): the backend server ({server}) does not take them."
        payload |= {"model": model.name, **body}
        started = time.perf_counter()
        if settings.mode == "beam":  # whole, like local beams; vLLM returns n beams, best first
            return self.stats.counted(self._beam(path, payload, settings, chat, notice))
        payload |= {"stream": True, "stream_options": {"include_usage": True}}
        response = self._open(path, payload, settings, chat)
        replies = self._streamed(response, settings, chat, notice, started)
        return ReplyStream(
            self.stats.counted(replies), response.close if response is not None else lambda: None
        )

    def _open(self, path: str, payload: dict, settings: GenerationSettings, chat: bool):
        """Log-probabilities only when asked for (the API, or the UI's colouring): llama.cpp streams
        differently with them (a character split over two tokens is lost)."""
        if settings.logprobs >= 0:  # llama.cpp gives none for chat's top_logprobs 0: ask for one, keep none
            payload = payload | logprob_params(chat, max(settings.logprobs, 1))
        return self.client.open_stream(path, payload)

    def _streamed(self, response, settings, chat: bool, notice, started: float) -> Iterator[Reply]:
        text, pieces, finish, usage, first = "", 0, None, {}, None
        tokens, added = [], []  # all the tokens the server reported, and those not yet passed on
        try:
            for event in self.client.events(response):
                usage = event.get("usage") or usage
                for choice in event.get("choices") or []:
                    if choice.get("index", 0) != 0:
                        continue
                    finish = choice.get("finish_reason") or finish
                    reported = tokens_of(choice, chat, settings.logprobs)
                    tokens += reported
                    added += reported
                    piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if not piece:
                        continue
                    text, pieces = text + piece, pieces + 1
                    now = time.perf_counter() - started
                    first = first if first is not None else now
                    shown = text.lstrip() if chat else text
                    yield Reply(
                        shown,
                        False,
                        pieces,
                        now,
                        settings.seed,
                        settings.mode,
                        None,
                        notice,
                        first,
                        added=tuple(added),
                    )
                    added = []
        finally:
            response.close()
        if finish is None:  # llama.cpp does this for a prompt past its context, or a request it interrupts
            raise BackendError(
                "The backend server ended the reply without saying why (no finish_reason); llama.cpp does "
                "that for a prompt longer than its context window. Its log has the reason."
            )
        counted = len(tokens) or pieces  # what was seen, where the server sends no usage (llama.cpp)
        final = self._final(
            text.lstrip() if chat else text, finish, usage, counted, settings, notice, started, first
        )
        yield replace(final, tokens=tuple(tokens), added=tuple(added))

    def _beam(self, path: str, payload: dict, settings, chat: bool, notice) -> Iterator[Reply]:
        """Posted when first asked for, so the UI shows that a beam search is running meanwhile."""
        started = time.perf_counter()
        result = self.client.post_json(path, payload)
        choice = (result.get("choices") or [{}])[0]
        text = ((choice.get("message") or {}).get("content") if chat else choice.get("text")) or ""
        usage = result.get("usage") or {}
        seconds = time.perf_counter() - started
        text = text.strip() if chat else text
        yield self._final(text, choice.get("finish_reason"), usage, 0, settings, notice, started, seconds)

    @staticmethod
    def _final(text, finish, usage: dict, pieces: int, settings, notice, started: float, first) -> Reply:
        return Reply(
            text=text,
            done=True,
            new_tokens=int(usage.get("completion_tokens") or pieces),
            seconds=time.perf_counter() - started,
            seed=settings.seed,
            mode=settings.mode,
            finish_reason=finish,  # OpenAI's "stop" covers both a stop word and the model's end
            notice=notice,
            first_token_seconds=first,
            prompt_tokens=usage.get("prompt_tokens"),
        )


def png_bytes(image: Image.Image) -> bytes:
    """Lossless, so the server sees the pixels the user uploaded (after our checks and resizing)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class RemoteVisionService:
    """VisionService's public interface: images go to the backend server inside chat messages."""

    def __init__(self, chat: RemoteChatService, limits: ServerLimits, images: ImageLimits):
        self.chat = chat
        self.holder = chat.holder
        self.limits = limits
        self.image_limits = images

    def family(self) -> str:
        return "remote"

    def choose_pipeline(self, requested: str) -> str:
        """The server picks its pipeline; ours honours "caption" through the image_pipeline extension."""
        if requested not in PIPELINES:
            raise BadInput(f"Unknown image pipeline {requested!r}; choose one of {', '.join(PIPELINES)}.")
        takes_choice = "image_pipeline" in self.holder.capabilities.extensions
        return "caption" if requested == "caption" and takes_choice else "vision"

    takes_conversation_images = True  # every image of a conversation goes on, each in its turn

    def caption(self, image_source, prompt: str, settings: GenerationSettings) -> Iterator[Reply]:
        if not isinstance(prompt, str) or len(prompt) > self.limits.max_input_chars:
            raise BadInput(f"The prompt must be text of at most {self.limits.max_input_chars:,} characters.")
        image = load_image(image_source, self.image_limits)
        question = prompt.strip() or IMAGE_QUESTION
        one = ConversationImages.of([(image,)])
        return self.chat.image_chat(question, one, [], replace(settings, system_prompt=""), "auto")

    def visual_chat(
        self,
        message: str,
        image_source,
        history: list[Turn],
        settings: GenerationSettings,
        pipeline: str = "auto",
    ) -> VisualReply:
        """`image_source`: a ConversationImages (each image in its turn), or one image for the new message."""
        chosen = self.choose_pipeline(pipeline)
        self.limits.check_text("Message", message)
        if isinstance(image_source, ConversationImages):
            images = image_source.loaded(len(history), self.image_limits)
        else:
            images = ConversationImages.of(
                [()] * len(history) + [(load_image(image_source, self.image_limits),)]
            )
        return VisualReply(chosen, None, self.chat.image_chat(message, images, history, settings, pipeline))
