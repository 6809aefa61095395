"""The OpenAI-compatible API under /v1, on the same server and engine as the Gradio app.

GET /v1/models, POST /v1/chat/completions and POST /v1/completions, streamed as server-sent events
or whole. Requests go through the ChatService / VisionService objects the UI uses, so they share
the engine's batch and queue with browser users. Request parsing lives in backend.openai_server.schema.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from backend.contracts import IMAGES_OFF, takes_conversation_images
from backend.images import ImageLimits
from backend.openai_server.http import (
    END,
    ClosingStreamingResponse,
    OpenAIRoute,
    api_error,
    key_check,
    next_item,
    rate_check,
    read_json,
)
from backend.openai_server.responses import (
    Interleaved,
    Shape,
    Started,
    close_all,
    finish_reason,
    sse,
    usage_of,
)
from backend.openai_server.schema import (
    CHAT_MAX_TOKENS,
    COMPLETION_MAX_TOKENS,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    Conversation,
    SamplingRequest,
    parse_request,
    plan_choices,
    refuse_unsupported,
    to_conversation,
)
from backend.replies import Reply
from backend.settings import ServerLimits

log = logging.getLogger(__name__)

OWNER = "chat-caption-playground"
LOCAL_EXTENSIONS = frozenset({"top_k", "repetition_penalty", "use_beam_search", "num_beams"})
IMAGE_EXTENSIONS = frozenset({"image_url", "image_pipeline"})


class OpenAIApi:
    def __init__(self, chat, vision, limits: ServerLimits, model_name, extensions: frozenset[str] | None):
        self.chat, self.vision, self.limits = chat, vision, limits
        self._model_name = model_name
        default = LOCAL_EXTENSIONS | (IMAGE_EXTENSIONS if vision is not None else frozenset())
        self.extensions = default if extensions is None else frozenset(extensions)
        self.image_limits = vision.image_limits if vision is not None else ImageLimits()
        self.image_bytes = self.image_limits.max_bytes
        self.body_limit = 3 * self.image_bytes + 32 * limits.max_input_chars + 2**16
        self.created = int(time.time())

    def served_name(self) -> str:
        return self._model_name() if callable(self._model_name) else self._model_name

    def check_model(self, name: str) -> None:
        served = self.served_name()
        if name not in (served, self.chat.holder.loaded_name):
            raise ApiError(
                404,
                f"The model '{name}' does not exist; this server serves '{served}' (GET /v1/models).",
                "model",
                "model_not_found",
            )

    async def models(self) -> JSONResponse:
        card = {
            "id": self.served_name(),
            "object": "model",
            "created": self.created,
            "owned_by": OWNER,
            "extensions": sorted(self.extensions),  # what RemoteCapabilities reads
        }
        holder = self.chat.holder
        if holder.status().state == "ready":
            card["max_model_len"] = holder.get().context_window
        return JSONResponse({"object": "list", "data": [card]})

    async def chat_completions(self, request: Request) -> Response:
        body = parse_request(ChatCompletionRequest, await read_json(request, self.body_limit))
        self.check_model(body.model)
        refuse_unsupported(body, self.extensions)
        conversation = to_conversation(
            body.messages, self.limits.max_input_chars, self.image_bytes, self.image_limits.max_images
        )
        if conversation.images.count and self.vision is None:
            raise ApiError(400, IMAGES_OFF, "messages")
        if conversation.images.count > 1 and not takes_conversation_images(self.vision):
            raise ApiError(
                400,
                f"The conversation has {conversation.images.count} images; the model server behind this "
                "API reads one image per request.",
                "messages",
            )
        plan = plan_choices(body, self.limits, CHAT_MAX_TOKENS, conversation.system_prompt)
        started = await run_in_threadpool(self._start_chat, conversation, plan, body.image_pipeline)
        return await self._respond(request, body, started, Shape(chat=True, model=body.model))

    def _start_chat(self, conversation: Conversation, plan, pipeline: str) -> Started:
        streams: list[Iterator[Reply]] = []
        try:
            for settings in plan:
                if not conversation.images.count:
                    streams.append(self.chat.chat(conversation.message, conversation.history, settings))
                    continue
                several = takes_conversation_images(self.vision)
                images = conversation.images if several else conversation.image
                result = self.vision.visual_chat(
                    conversation.message, images, conversation.history, settings, pipeline
                )
                streams.append(result.replies)
        except BaseException:
            close_all(streams)
            raise
        return Started(streams, len(streams), logprobs=plan[0].logprobs >= 0)

    async def completions(self, request: Request) -> Response:
        body = parse_request(CompletionRequest, await read_json(request, self.body_limit))
        self.check_model(body.model)
        refuse_unsupported(body, self.extensions)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ApiError(400, "'prompt' is an empty list.", "prompt")
        limit = self.limits.max_input_chars
        for index, prompt in enumerate(prompts):
            if len(prompt) > limit:
                raise ApiError(
                    413,
                    f"Prompt {index} is {len(prompt):,} characters; the limit is {limit:,}.",
                    "prompt",
                )
        plan = plan_choices(body, self.limits, COMPLETION_MAX_TOKENS, prompts=len(prompts))
        started = await run_in_threadpool(self._start_completions, prompts, plan)
        prefixes = [prompt for prompt in prompts for _ in plan] if body.echo else []
        return await self._respond(
            request, body, started, Shape(chat=False, model=body.model, prefixes=prefixes)
        )

    def _start_completions(self, prompts: list[str], plan) -> Started:
        streams: list[Iterator[Reply]] = []
        try:
            for prompt in prompts:
                streams += [self.chat.complete(prompt, settings) for settings in plan]
        except BaseException:
            close_all(streams)
            raise
        return Started(streams, len(plan), logprobs=plan[0].logprobs >= 0)

    async def _respond(
        self, request: Request, body: SamplingRequest, started: Started, shape: Shape
    ) -> Response:
        merged = Interleaved(started.streams)
        try:
            first = await next_item(merged)  # errors before the first reply still get their HTTP status
        except BaseException:
            merged.close()
            raise
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._events(merged, first, started, shape, include_usage)
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return ClosingStreamingResponse(events, media_type="text/event-stream", headers=headers)
        finals: dict[int, Reply] = {}
        try:
            item = first
            while item is not END:
                index, reply = item
                if reply.queue_position is None:
                    finals[index] = reply
                if await request.is_disconnected():
                    return Response(status_code=499)  # nobody to answer; `finally` stops the generation
                item = await next_item(merged)
        finally:
            merged.close()
        usage = usage_of(await run_in_threadpool(started.prompt_tokens, finals), finals)
        return JSONResponse(shape.whole(finals, usage, logprobs=started.logprobs))

    async def _events(self, merged: Interleaved, first, started: Started, shape: Shape, include_usage: bool):
        sent: dict[int, str] = {}
        finals: dict[int, Reply] = {}
        # With logprobs: each choice's tokens not yet sent, and where the next one starts in its text.
        unsent: dict[int, list] | None = {} if started.logprobs else None
        token_offsets: dict[int, int] = {}

        def tokens_now(index: int):
            if unsent is None:
                return None, 0
            tokens = unsent.pop(index, [])
            start = token_offsets.get(index, len(shape.prefixes[index]) if shape.prefixes else 0)
            token_offsets[index] = start + sum(len(token.text) for token in tokens)
            return tokens, start

        try:
            item = first
            while item is not END:
                index, reply = item
                if reply.queue_position is not None:
                    yield f": waiting, number {reply.queue_position} in line\n\n"  # an SSE comment
                else:
                    finals[index] = reply
                    if unsent is not None and reply.added:
                        unsent.setdefault(index, []).extend(reply.added)
                    previous = sent.get(index)
                    grows = reply.text.startswith(previous or "")  # never take back what was sent
                    delta = reply.text[len(previous or "") :] if grows else ""
                    if previous is None or delta:
                        tokens, offset = tokens_now(index)
                        yield sse(shape.chunk(index, delta, previous is None, None, tokens, offset))
                        sent[index] = reply.text if grows else previous
                    if reply.done:
                        tokens, offset = tokens_now(index)
                        yield sse(shape.chunk(index, "", False, finish_reason(reply), tokens or None, offset))
                item = await next_item(merged)
            if include_usage:
                prompt_tokens = await run_in_threadpool(started.prompt_tokens, finals)
                yield sse(shape.usage_chunk(usage_of(prompt_tokens, finals)))
        except Exception as error:  # headers are sent: the error goes into the stream, as vLLM does
            yield sse(api_error(error).body())
        finally:
            merged.close()
        yield sse("[DONE]")


def build_openai_router(
    chat,
    vision,
    api_key: str | None,
    model_name: str | Callable[[], str],
    limits: ServerLimits | None = None,
    extensions: frozenset[str] | None = None,
    rate_limit=None,
) -> APIRouter:
    """The /v1 routes over `chat` (a ChatService or RemoteChatService) and `vision` (or None).

    `model_name` is the id clients send (a callable when it is only known later, e.g. remote);
    `extensions` are the non-OpenAI parameters accepted (default: all of ours); `rate_limit` (a
    backend.services.rate_limit.ClientRateLimit) counts generation requests per client, after the key check.
    """
    api = OpenAIApi(chat, vision, limits or ServerLimits(), model_name, extensions)
    router = APIRouter(prefix="/v1", route_class=OpenAIRoute, dependencies=[Depends(key_check(api_key))])
    router.add_api_route("/models", api.models, methods=["GET"])
    limited = [Depends(rate_check(rate_limit))]
    router.add_api_route("/chat/completions", api.chat_completions, methods=["POST"], dependencies=limited)
    router.add_api_route("/completions", api.completions, methods=["POST"], dependencies=limited)

    async def unknown(path: str) -> Response:
        raise ApiError(404, f"There is no endpoint /v1/{path} (see GET /v1/models).", code="unknown_url")

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    router.add_api_route("/{path:path}", unknown, methods=methods, include_in_schema=False)
    return router
