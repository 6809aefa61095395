"""The requests the UI and API make, independent of Gradio: chat and raw completion, streamed."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from backend.contracts import ModelSource
from backend.decode.engine import Engine, EngineLimits
from backend.decode.inspector import Inspector, token_after
from backend.errors import BadInput, ContextOverflow, InvalidSettings
from backend.prompting import (
    Prompt,
    Turn,
    build_chat_prompt,
    build_raw_prompt,
    encode_rendered,
    prompt_budget,
    render_chat,
)
from backend.replies import Reply, ReplyStream, replies_from_updates
from backend.request_stats import RequestStats
from backend.services.model_engine import ModelEngine
from backend.settings import GenerationSettings, ServerLimits
from backend.token_probs import NextTokens
from backend.torch_threads import call_on_fresh_thread

log = logging.getLogger(__name__)


def check_adapter(loaded, name: str) -> None:
    """The adapter must be one loaded on this model (those given at launch that fit it), or ""."""
    available = ("", *getattr(loaded, "adapters", ()))
    if name not in available:
        choices = ", ".join(repr(choice) for choice in available)
        raise InvalidSettings(
            "adapter", f"this model has no adapter {name!r}; choose one of {choices} ('' is the base model)"
        )


class ChatService:
    def __init__(
        self,
        holder: ModelSource,
        limits: ServerLimits,
        engine_limits: EngineLimits | None = None,
        stats: RequestStats | None = None,
    ):
        self.holder = holder
        self.limits = limits
        self.engine_limits = engine_limits or EngineLimits()
        self._engines = ModelEngine(holder, self.engine_limits)
        self._inspector: Inspector | None = None
        self.stats = stats or RequestStats()
        holder.register_requests(self.in_flight, self.release)

    @property
    def adapters(self) -> tuple[str, ...]:
        """What a request's `adapter` may name: "" (the base model), then the adapters given at launch."""
        return ("", *(adapter.name for adapter in self.holder.spec.adapters))

    def in_flight(self) -> int:
        """Requests the model has not finished yet (a model switch waits for them)."""
        return self._engines.pending()

    def queue_stats(self) -> tuple[int, int]:
        """(requests decoding, requests waiting) in the engine now."""
        return self._engines.queue_stats()

    def kv_usage(self) -> tuple[int, int | None] | None:
        """(KV tokens the running requests hold, the model's KV budget); None while no engine runs."""
        return self._engines.kv_usage()

    def decode_path(self) -> str | None:
        """Which decode step the engine runs; None while no engine runs."""
        return self._engines.decode_path()

    def release(self, reason: str) -> None:
        """Let go of the model before a switch: requests still in the engine fail with `reason`."""
        self._engines.release(reason)
        self._inspector = None

    def chat(self, message: str, history: list[Turn], settings: GenerationSettings) -> Iterator[Reply]:
        """Check the message and the model-dependent settings, then return the stream of the reply.

        Not a generator itself: bad input raises here, before the caller shows anything.
        """
        self.limits.check_text("Message", message)
        loaded = self.holder.get()
        check_adapter(loaded, settings.adapter)
        budget = prompt_budget(loaded.context_window, settings.max_new_tokens)
        prompt = build_chat_prompt(loaded.tokenizer, settings.system_prompt, history, message.strip(), budget)
        return self._run(loaded, prompt, settings, strip_leading_space=True)

    def complete(self, text: str, settings: GenerationSettings) -> Iterator[Reply]:
        """Continue `text` as is, no chat template; the stream holds only the continuation."""
        self.limits.check_text("Text", text)
        loaded = self.holder.get()
        check_adapter(loaded, settings.adapter)
        budget = prompt_budget(loaded.context_window, settings.max_new_tokens)
        prompt = build_raw_prompt(loaded.tokenizer, text, budget)
        return self._run(loaded, prompt, settings, strip_leading_space=False)

    def _run(
        self, loaded, prompt: Prompt, settings: GenerationSettings, strip_leading_space: bool
    ) -> Iterator[Reply]:
        notice = None
        if prompt.dropped_turns:
            turns = "turn was" if prompt.dropped_turns == 1 else "turns were"
            notice = f"The {prompt.dropped_turns} oldest {turns} left out to fit the model's context window."
        engine = self.engine(loaded)
        submit = engine.submit_beam if settings.mode == "beam" else engine.submit
        handle = submit(prompt.ids, settings)  # queued now: a full queue refuses before anything is shown
        return ReplyStream(
            self.stats.counted(
                replies_from_updates(
                    iter(handle), settings, notice, len(prompt.ids), strip_leading_space, engine.seed_holds
                )
            ),
            handle.cancel,
        )

    def engine(self, loaded) -> Engine:
        """The engine for the loaded model; a model switch gets a fresh one."""
        return self._engines.get(loaded, loaded.model)

    def inspector(self) -> Inspector:
        loaded = self.holder.get()
        inspector = self._inspector
        if inspector is None or inspector.model is not loaded.model:  # a new model needs a new cache
            inspector = self._inspector = Inspector(loaded.model, loaded.tokenizer)
        return inspector

    def text_ids(self, text: str) -> list[int]:
        """Raw text as the tokenizer encodes it (BOS as it adds it); a rendered chat keeps one BOS."""
        if not isinstance(text, str):
            raise BadInput("Text must be a string.")
        if len(text) > self.limits.max_input_chars:
            raise BadInput(f"Text is {len(text):,} characters; the limit is {self.limits.max_input_chars:,}.")
        loaded = self.holder.get()
        ids = encode_rendered(loaded.tokenizer, text)
        if not ids:
            raise BadInput("Text is empty and this tokenizer adds no BOS token: type something.")
        if len(ids) > loaded.context_window:
            raise ContextOverflow(
                f"The text is {len(ids)} tokens; the context window is {loaded.context_window}."
            )
        return ids

    def next_tokens(self, text: str, settings: GenerationSettings, n: int) -> NextTokens:
        """The top-n next tokens after `text`, before and after the warpers of `settings`."""
        check_adapter(self.holder.get(), settings.adapter)
        return call_on_fresh_thread(self.inspector().next_tokens, self.text_ids(text), settings, n)

    def step_text(self, text: str, settings: GenerationSettings) -> str:
        """`text` plus the token generation would choose next (greedy, or seeded sample)."""
        loaded = self.holder.get()
        check_adapter(loaded, settings.adapter)
        ids = self.text_ids(text)
        chosen = call_on_fresh_thread(self.inspector().step, ids, settings)
        return text + token_after(loaded.tokenizer, ids, chosen)

    def append_token(self, text: str, token_id: int) -> str:
        """`text` plus token `token_id` as it reads after it: the Inspector's click on a listed token."""
        tokenizer = self.holder.get().tokenizer
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < len(tokenizer):
            raise BadInput(f"Token id {token_id!r} is not one of this tokenizer's 0 … {len(tokenizer) - 1}.")
        return text + token_after(tokenizer, self.text_ids(text), token_id)

    def chat_context(self, history: list[Turn], system_prompt: str) -> str:
        """The chat as the model reads it, up to the end of the last reply."""
        if not history:
            raise BadInput("The chat is empty: send a message first.")
        loaded = self.holder.get()
        text, _ = render_chat(loaded.tokenizer, system_prompt, history[:-1], history[-1].user)
        reply = history[-1].assistant
        # Replies are shown without the space the model wrote after e.g. "ASSISTANT:"; put it back.
        if text and not text[-1].isspace() and reply and not reply[0].isspace():
            reply = " " + reply
        return text + reply
