"""The requests the UI and API make, independent of Gradio: chat and raw completion, streamed."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from backend.errors import BadInput, ContextOverflow
from backend.generation import GenerationUpdate, generate_beam, stream_generate
from backend.model_holder import ModelHolder
from backend.prompting import Prompt, Turn, build_chat_prompt, build_raw_prompt
from backend.replies import Reply
from backend.settings import GenerationSettings, ServerLimits

log = logging.getLogger(__name__)


def prompt_budget(context_window: int, max_new_tokens: int) -> int:
    """Tokens left for the prompt once the reply's room is kept free."""
    budget = context_window - max_new_tokens
    if budget <= 0:
        raise ContextOverflow(
            f"max_new_tokens ({max_new_tokens}) leaves no room for the prompt in this model's "
            f"{context_window}-token context window; lower it."
        )
    return budget


class ChatService:
    def __init__(self, holder: ModelHolder, limits: ServerLimits):
        self.holder = holder
        self.limits = limits

    def chat(self, message: str, history: list[Turn], settings: GenerationSettings) -> Iterator[Reply]:
        """Check everything, then return the stream of the reply to `message` after `history`.

        Not a generator itself: bad input raises here, before the caller shows anything.
        """
        self._check_text("Message", message)
        settings = settings.validated(self.limits).with_seed()
        loaded = self.holder.get()
        budget = prompt_budget(loaded.context_window, settings.max_new_tokens)
        prompt = build_chat_prompt(loaded.tokenizer, settings.system_prompt, history, message.strip(), budget)
        return self._run(loaded, prompt, settings, strip_leading_space=True)

    def complete(self, text: str, settings: GenerationSettings) -> Iterator[Reply]:
        """Continue `text` as is, no chat template; the stream holds only the continuation."""
        self._check_text("Text", text)
        settings = settings.validated(self.limits).with_seed()
        loaded = self.holder.get()
        budget = prompt_budget(loaded.context_window, settings.max_new_tokens)
        prompt = build_raw_prompt(loaded.tokenizer, text, budget)
        return self._run(loaded, prompt, settings, strip_leading_space=False)

    def _check_text(self, what: str, text: str) -> None:
        if not isinstance(text, str) or not text.strip():
            raise BadInput(f"{what} is empty: type something to send.")
        if len(text) > self.limits.max_input_chars:
            raise BadInput(
                f"{what} is {len(text):,} characters; the limit is {self.limits.max_input_chars:,}."
            )

    def _run(
        self, loaded, prompt: Prompt, settings: GenerationSettings, strip_leading_space: bool
    ) -> Iterator[Reply]:
        notice = None
        if prompt.dropped_turns:
            turns = "turn was" if prompt.dropped_turns == 1 else "turns were"
            notice = f"The {prompt.dropped_turns} oldest {turns} left out to fit the model's context window."
        if settings.mode == "beam":
            updates: Iterator[GenerationUpdate] = iter(
                [generate_beam(loaded.model, loaded.tokenizer, prompt.ids, settings)]
            )
        else:
            updates = stream_generate(loaded.model, loaded.tokenizer, prompt.ids, settings)
        for update in updates:
            text = update.text.lstrip() if strip_leading_space else update.text
            yield Reply(
                text=text,
                done=update.finished,
                new_tokens=update.new_tokens,
                seconds=update.seconds,
                seed=settings.seed,
                mode=settings.mode,
                finish_reason=update.finish_reason,
                notice=notice,
                first_token_seconds=update.first_token_seconds,
            )
