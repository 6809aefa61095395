"""Named API endpoints for gradio_client users: stateless chat and raw completion, streamed."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import gradio as gr

from backend.contracts import IMAGES_OFF
from backend.errors import BadInput, UserError
from backend.settings import GenerationSettings, ServerLimits, request_settings
from backend.zero_gpu import on_gpu
from ui.handlers import api_stream, metered_chat, metered_vision

log = logging.getLogger(__name__)

D = GenerationSettings()


def settings_values(arguments: dict) -> dict:
    """The endpoint's arguments that are settings (locals() also holds closure variables)."""
    return {name: arguments[name] for name in GenerationSettings.field_names() if name in arguments}


def register_api(service, vision, limits: ServerLimits, concurrency: int, rate_limit=None) -> None:
    """Call inside the Blocks context. Parameters mirror GenerationSettings (checked by a test).

    `rate_limit`: a backend.services.rate_limit.ClientRateLimit every call counts against, or None.
    """

    @on_gpu
    def chat(
        message: str,
        system_prompt: str = D.system_prompt,
        seed: int = D.seed,
        mode: str = D.mode,
        temperature: float = D.temperature,
        top_k: int = D.top_k,
        top_p: float = D.top_p,
        max_new_tokens: int = D.max_new_tokens,
        repetition_penalty: float = D.repetition_penalty,
        num_beams: int = D.num_beams,
        stop_words: str = "",
        adapter: str = D.adapter,
        request: gr.Request = None,
    ) -> Iterator[str]:
        """Reply to one message (no history). stop_words: one per line. Streams the reply so far."""
        values = settings_values(locals())
        chat_service = metered_chat(service, rate_limit, request)
        yield from api_stream(lambda: chat_service.chat(message, [], request_settings(values, limits)))

    @on_gpu
    def complete(
        text: str,
        seed: int = D.seed,
        mode: str = D.mode,
        temperature: float = D.temperature,
        top_k: int = D.top_k,
        top_p: float = D.top_p,
        max_new_tokens: int = D.max_new_tokens,
        repetition_penalty: float = D.repetition_penalty,
        num_beams: int = D.num_beams,
        stop_words: str = "",
        adapter: str = D.adapter,
        request: gr.Request = None,
    ) -> Iterator[str]:
        """Continue `text` as is (no chat template). Streams the continuation only."""
        values = settings_values(locals())
        chat_service = metered_chat(service, rate_limit, request)
        yield from api_stream(lambda: chat_service.complete(text, request_settings(values, limits)))

    @on_gpu
    def next_tokens(
        text: str,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        n: int = 10,
        request: gr.Request = None,
    ) -> dict:
        """Top-n next tokens after `text` (raw, BOS as the tokenizer adds it): p_raw and p_final."""
        settings = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        try:
            checked = GenerationSettings.from_inputs(
                {**settings, "repetition_penalty": repetition_penalty}, limits
            )
            return metered_chat(service, rate_limit, request).next_tokens(text, checked, int(n)).to_dict()
        except UserError as error:
            log.warning("Refused an API request (%s): %s", type(error).__name__, error)
            raise gr.Error(str(error), print_exception=False) from None

    gr.api(next_tokens, api_name="next_tokens", concurrency_id="inspector")

    @on_gpu
    def caption(
        image: gr.FileData,
        prompt: str = "",
        seed: int = D.seed,
        mode: str = D.mode,
        temperature: float = D.temperature,
        top_k: int = D.top_k,
        top_p: float = D.top_p,
        max_new_tokens: int = D.max_new_tokens,
        repetition_penalty: float = D.repetition_penalty,
        num_beams: int = D.num_beams,
        stop_words: str = "",
        request: gr.Request = None,
    ) -> Iterator[str]:
        """Caption `image`, or answer `prompt` about it. Streams the caption so far."""
        values = settings_values(locals())
        path = image.get("path") if isinstance(image, dict) else image

        def replies():
            if vision is None:
                raise BadInput(IMAGES_OFF)
            settings = request_settings(values, limits)
            return metered_vision(vision, rate_limit, request).caption(path, prompt, settings)

        yield from api_stream(replies)

    for endpoint in (chat, complete, caption):
        gr.api(
            endpoint, api_name=endpoint.__name__, concurrency_limit=concurrency, concurrency_id="generation"
        )
