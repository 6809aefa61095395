"""Named API endpoints for gradio_client users: stateless chat and raw completion, streamed."""

from __future__ import annotations

from collections.abc import Iterator

import gradio as gr

from backend.settings import GenerationSettings, ServerLimits
from ui.handlers import api_stream

D = GenerationSettings()


def settings_values(arguments: dict) -> dict:
    """The endpoint's arguments that are settings (locals() also holds closure variables)."""
    return {name: arguments[name] for name in GenerationSettings.field_names() if name in arguments}


def register_api(service, limits: ServerLimits, concurrency: int) -> None:
    """Call inside the Blocks context. Parameters mirror GenerationSettings (checked by a test)."""

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
    ) -> Iterator[str]:
        """Reply to one message (no history). stop_words: one per line. Streams the reply so far."""
        values = settings_values(locals())
        yield from api_stream(
            lambda: service.chat(message, [], GenerationSettings.from_inputs(values, limits))
        )

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
    ) -> Iterator[str]:
        """Continue `text` as is (no chat template). Streams the continuation only."""
        values = settings_values(locals())
        yield from api_stream(lambda: service.complete(text, GenerationSettings.from_inputs(values, limits)))

    for endpoint in (chat, complete):
        gr.api(
            endpoint, api_name=endpoint.__name__, concurrency_limit=concurrency, concurrency_id="generation"
        )
