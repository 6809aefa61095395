"""OpenAI-compatible requests: pydantic models, and their mapping onto our conversation and settings.

Pure Python (pydantic, no torch, no FastAPI) so each mapping rule can be unit-tested on its own.
Names follow OpenAI; top_k, repetition_penalty, use_beam_search and best_of follow vLLM's extensions.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backend.errors import InvalidSettings
from backend.images import ConversationImages, ImageLimits
from backend.prompting import Turn
from backend.settings import MAX_SEED, GenerationSettings, ServerLimits, request_settings

MAX_CHOICES = 8  # n × prompts per request: each choice is a full generation
CHAT_MAX_TOKENS = GenerationSettings().max_new_tokens  # OpenAI: "the model's limit"; ours is finite
COMPLETION_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
IMAGE_ONLY_QUESTION = "Describe the image."
IMAGES_ONLY_QUESTION = "Describe the images."
MAX_IMAGES = ImageLimits().max_images  # images per request, the whole conversation's
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs, as OpenAI allows
MAX_COMPLETION_LOGPROBS = 5  # completions' logprobs, as OpenAI allows
# Our settings fields under the names a client used, for error messages.
# Standard OpenAI parameters this server does not offer: accepted only at their neutral values.
UNSUPPORTED = (
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "tools",
    "tool_choice",
    "suffix",
)
PARAM_NAMES = {"max_new_tokens": "max_tokens", "stop_words": "stop", "system_prompt": "messages"}


class ApiError(Exception):
    """An error with its HTTP status, in OpenAI's shape: {"error": {message, type, param, code}}."""

    TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class Strict(BaseModel):
    # Clients send fields newer than this server; like vLLM, ignore them.
    model_config = ConfigDict(extra="ignore")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImageURL(Strict):
    url: str
    detail: str | None = None


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingRequest(Strict):
    """Fields both endpoints share. None means "not sent": the OpenAI default applies."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    # Standard but not offered: accepted only at their neutral values.
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extensions, and ours (num_beams).
    top_k: int | None = None
    repetition_penalty: float | None = None
    use_beam_search: bool | None = False
    best_of: int | None = None
    num_beams: int | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    image_pipeline: Literal["auto", "vision", "caption"] = "auto"


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]
    echo: bool | None = False
    suffix: str | None = None
    logprobs: int | None = None


def parse_request(model: type[Strict], data: Any) -> Any:
    """Validate a decoded JSON body; a bad field becomes a 400 naming it."""
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = param_path(first["loc"])
        raise ApiError(400, f"Invalid value for '{param}': {first['msg']}.", param) from None


def param_path(loc: tuple) -> str:
    """('messages', 0, 'content') -> 'messages[0].content'; drops pydantic's union-member tags."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in {"str", "list[...]"} or "[" in str(part):
            break  # "str" / "list[tagged-union[...]]": which member of a union pydantic tried
        else:
            path += f".{part}" if path else str(part)
    return path


def refuse_unsupported(request: SamplingRequest, extensions: frozenset[str]) -> None:
    """400 for any parameter this server would otherwise silently ignore."""
    for name in UNSUPPORTED:
        if getattr(request, name, None) not in (None, 0, False, "", "none", [], {}):
            hint = "; use repetition_penalty instead" if name.endswith("_penalty") else ""
            raise ApiError(400, f"'{name}' is not supported by this server{hint}.", name)
    response_format = getattr(request, "response_format", None)
    if response_format and response_format.get("type") != "text":
        raise ApiError(400, 'Only response_format {"type": "text"} is supported.', "response_format")
    for name in ("top_k", "repetition_penalty"):
        if getattr(request, name) is not None and name not in extensions:
            raise ApiError(400, f"'{name}' is not supported by the model server behind this API.", name)
    if beam_requested(request) and "use_beam_search" not in extensions:
        raise ApiError(
            400, "Beam search is not supported by the model server behind this API.", "use_beam_search"
        )
    if request.best_of not in (None, 1) and not request.use_beam_search:
        raise ApiError(400, "'best_of' is only taken as the beam width, with use_beam_search.", "best_of")


def beam_requested(request: SamplingRequest) -> bool:
    return bool(request.use_beam_search) or (request.num_beams or 1) > 1


def plan_choices(
    request: SamplingRequest,
    limits: ServerLimits,
    default_max_tokens: int,
    system_prompt: str = "",
    prompts: int = 1,
) -> tuple[GenerationSettings, ...]:
    """Map OpenAI names onto GenerationSettings (validated by from_inputs); one per choice, seeds
    seed, seed+1, … (a drawn seed when none was sent).

    Beam search returns only the best beam: its width is num_beams, else best_of (vLLM < 0.6),
    else n (vLLM >= 0.6), and then exactly one choice comes back.
    """
    beam = beam_requested(request)
    n = 1 if beam else (request.n if request.n is not None else 1)
    if not 1 <= n * prompts <= MAX_CHOICES:
        raise ApiError(400, f"n × prompts must be between 1 and {MAX_CHOICES}, got {n * prompts}.", "n")
    beam_param = next((p for p in ("num_beams", "best_of") if getattr(request, p) not in (None, 1)), "n")
    width = (getattr(request, beam_param) or 1) if beam else 1
    max_tokens = getattr(request, "max_completion_tokens", None)
    max_tokens = request.max_tokens if max_tokens is None else max_tokens
    if max_tokens is None:
        max_tokens = min(default_max_tokens, limits.max_new_tokens)
    temperature = 1.0 if request.temperature is None else request.temperature
    values = {
        "seed": request.seed,
        "mode": "beam" if beam else ("greedy" if temperature == 0 else "sample"),
        "temperature": temperature,
        "top_k": 0 if request.top_k in (None, -1) else request.top_k,  # vLLM: -1 or 0 means off
        "top_p": 1.0 if request.top_p is None else request.top_p,
        "max_new_tokens": max_tokens,
        "repetition_penalty": 1.0 if request.repetition_penalty is None else request.repetition_penalty,
        "num_beams": width,
        "stop_words": [request.stop] if isinstance(request.stop, str) else list(request.stop or []),
        "system_prompt": system_prompt,
        "logprobs": logprobs_wanted(request),
    }
    try:
        base = request_settings(values, limits)
    except InvalidSettings as error:
        name = beam_param if error.field == "num_beams" else PARAM_NAMES.get(error.field, error.field)
        raise ApiError(400, str(error).replace(f"'{error.field}'", f"'{name}'"), name) from None
    seeds = [(base.seed + i) % (MAX_SEED + 1) for i in range(n)]
    return tuple(replace(base, seed=seed) for seed in seeds)


def logprobs_wanted(request: SamplingRequest) -> int:
    """-1 when the client did not ask for log-probabilities, else how many alternatives each token lists.

    Chat asks with `logprobs: true` and `top_logprobs` (0-20); completions with `logprobs` (0-5).
    """
    if isinstance(request, ChatCompletionRequest):
        top = request.top_logprobs
        if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
            raise ApiError(
                400, f"'top_logprobs' must be between 0 and {MAX_TOP_LOGPROBS}, got {top}.", "top_logprobs"
            )
        if not request.logprobs:
            if top:
                raise ApiError(400, "'top_logprobs' needs 'logprobs': true.", "top_logprobs")
            return -1
        return top or 0
    number = getattr(request, "logprobs", None)
    if number is None:
        return -1
    if not 0 <= number <= MAX_COMPLETION_LOGPROBS:
        raise ApiError(
            400, f"'logprobs' must be between 0 and {MAX_COMPLETION_LOGPROBS}, got {number}.", "logprobs"
        )
    if getattr(request, "echo", False):
        raise ApiError(
            400, "'logprobs' with 'echo' (the prompt's log-probabilities) is not supported.", "logprobs"
        )
    return number


@dataclass(frozen=True)
class Conversation:
    system_prompt: str
    history: list[Turn]
    message: str
    images: ConversationImages  # every image's bytes, decoded from its data: URL, in the turn that sent it

    @property
    def image(self) -> bytes | None:
        """The newest image in the conversation."""
        return self.images.newest()


def to_conversation(
    messages: list[ChatMessage], max_chars: int, max_image_bytes: int, max_images: int = MAX_IMAGES
) -> Conversation:
    """System messages join the system prompt; user/assistant pairs become turns; the last must be user's.

    Each user turn keeps the images its messages carried, in order; at most `max_images` in all.
    """
    count_images(messages, max_images)
    system, spoken = [], []
    for index, message in enumerate(messages):
        text, images = message_parts(message, index, max_image_bytes)
        if len(text) > max_chars:
            raise ApiError(
                413,
                f"Message {index} is {len(text):,} characters; the limit is {max_chars:,}.",
                f"messages[{index}].content",
            )
        if images and message.role != "user":
            raise ApiError(400, "Only user messages may carry images.", f"messages[{index}].content")
        role = "system" if message.role == "developer" else message.role
        if role == "system":
            system.append(text)
        elif spoken and spoken[-1][0] == role:  # consecutive messages of one role read as one
            spoken[-1] = (role, f"{spoken[-1][1]}\n\n{text}", spoken[-1][2] + images)
        else:
            spoken.append((role, text, images))
    if not spoken or spoken[-1][0] != "user":
        raise ApiError(400, "The last message must be the user's (role 'user').", "messages")
    turns, by_turn, pending, pending_images = [], [], "", []
    for role, text, images in spoken[:-1]:
        if role == "user":
            pending, pending_images = text, images
        else:
            turns.append(Turn(pending, text))
            by_turn.append(pending_images)
            pending, pending_images = "", []
    _, message, new_images = spoken[-1]
    images = ConversationImages.of([*by_turn, new_images])
    if images.count and not message.strip():
        message = IMAGES_ONLY_QUESTION if len(new_images) > 1 else IMAGE_ONLY_QUESTION
    return Conversation("\n\n".join(system), turns, message, images)


def count_images(messages: list[ChatMessage], max_images: int) -> None:
    """400 before any image is decoded when the conversation carries more than `max_images`."""
    count = sum(
        isinstance(part, ImagePart)
        for message in messages
        if isinstance(message.content, list)
        for part in message.content
    )
    if count > max_images:
        raise ApiError(
            400,
            f"The conversation has {count} images; the limit is {max_images} images per request "
            "(every image in the messages counts).",
            "messages",
        )


def message_parts(message: ChatMessage, index: int, max_image_bytes: int) -> tuple[str, list[bytes]]:
    if message.content is None or isinstance(message.content, str):
        return message.content or "", []
    texts, images = [], []
    for part_index, part in enumerate(message.content):
        if isinstance(part, TextPart):
            texts.append(part.text)
        else:
            param = f"messages[{index}].content[{part_index}].image_url.url"
            images.append(decode_data_url(part.image_url.url, max_image_bytes, param))
    return "\n".join(texts), images


def decode_data_url(url: str, max_bytes: int, param: str) -> bytes:
    """Images come inline only (data:image/...;base64,...): this server fetches nothing from the network."""
    header, comma, payload = url.partition(",")
    if not header.startswith("data:") or not comma or not header.endswith(";base64"):
        raise ApiError(
            400,
            "image_url must be a base64 data: URL (data:image/png;base64,...); remote URLs are not fetched.",
            param,
        )
    if len(payload) * 3 // 4 > max_bytes + 2:  # checked before decoding: base64 is 4 chars per 3 bytes
        raise ApiError(413, f"The image is over the {max_bytes / 2**20:.1f} MiB limit.", param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "The image's data: URL is not valid base64.", param) from None
    if len(data) > max_bytes:
        raise ApiError(413, f"The image is over the {max_bytes / 2**20:.1f} MiB limit.", param)
    return data
