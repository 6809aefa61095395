"""Streamed generation for one request: our decode loop for sample/greedy, generate() for beams.

Own loop because generate() draws samples from the process-global RNG, and per-request seeds
plus cancellation within one step need the sampling step in our hands.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import GenerationConfig

from backend.decode.sampling import (
    build_logits_processor,
    choose_next_token,
    is_greedy,
    make_generator,
    mask_unknown_tokens,
)
from backend.decode.stopping import REPLACEMENT_CHAR, StopWordMatcher, safe_decode
from backend.models.loading import input_device
from backend.settings import GenerationSettings
from backend.token_probs import TokenChoice

# Prompt tokens decoded with the reply so that its first token keeps its leading space.
DECODE_CONTEXT_TOKENS = 4


ALTERNATIVES_SHOWN = 3


@dataclass(frozen=True)
class GenerationUpdate:
    text: str  # the visible continuation so far; only ever grows
    new_tokens: int
    finished: bool = False
    finish_reason: str | None = None  # "stop_word", "eos" or "length" when finished
    seconds: float = 0.0
    first_token_seconds: float | None = None
    token: TokenChoice | None = None  # the token this update added (None for beams)
    queue_position: int | None = None  # set while the request waits for a place in the batch

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


class ContinuationDecoder:
    """Decodes generated ids to text the way they read after the prompt.

    Incrementally, as TGI's and vLLM's detokenizers do (a prefix and a read offset): a call decodes only the
    tokens since the text last settled, after the few before them, so a token costs the same at the
    2,000th as at the 20th. Decoding the whole reply every token cost 0.49 ms a token at 2,048 tokens here,
    for each row of a batch. `generated` only grows between calls, as a request's does.
    """

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.context = list(prompt_ids[-DECODE_CONTEXT_TOKENS:])
        self._restart()
        self.offset = len(self._text)

    def _restart(self) -> None:
        self._ids = list(self.context)  # the context, then the generated ids seen so far
        self._text = safe_decode(self.tokenizer, self._ids)  # the text of _ids[:_read], settled
        self._prefix, self._read = 0, len(self._ids)

    def decode(self, generated: list[int]) -> str:
        seen = len(self._ids) - len(self.context)
        if len(generated) < seen:  # not the same reply grown: start over
            self._restart()
            seen = 0
        self._ids.extend(generated[seen:])
        prefix = safe_decode(self.tokenizer, self._ids[self._prefix : self._read])
        window = safe_decode(self.tokenizer, self._ids[self._prefix :])
        if not window.startswith(prefix):  # a tokenizer that reads tokens differently together: all again
            text = safe_decode(self.tokenizer, self._ids)
            if not text.endswith(REPLACEMENT_CHAR):
                self._text = text
                self._prefix, self._read = max(0, len(self._ids) - DECODE_CONTEXT_TOKENS), len(self._ids)
            return text[self.offset :]
        new = window[len(prefix) :]
        if new.endswith(REPLACEMENT_CHAR):  # an unfinished UTF-8 sequence: shown as is, not settled
            return (self._text + new)[self.offset :]
        self._text += new
        self._prefix, self._read = self._read, len(self._ids)
        return self._text[self.offset :]


def eos_token_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    for value in configured if isinstance(configured, (list, tuple)) else [configured]:
        if value is not None:
            ids.add(int(value))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


@torch.inference_mode()
def _forward(model, input_ids: torch.Tensor, past_key_values):
    # inference_mode per call, not around the generator: a generator may resume on another thread.
    return model(input_ids=input_ids, past_key_values=past_key_values, use_cache=True)


class RequestState:
    """One request's decoding state: its warpers, RNG, stop words and text so far.

    `step(logits_row)` picks the next token from that request's own row of logits and says what
    the user sees now, so a batch of requests can share forward passes but nothing else.
    """

    def __init__(self, model, tokenizer, prompt_ids: list[int], settings: GenerationSettings):
        if settings.seed < 0:
            raise ValueError("a concrete seed is needed: settings.request_settings draws it")
        self.tokenizer = tokenizer
        self.settings = settings
        self.started = time.perf_counter()
        self.processors = build_logits_processor(settings)
        self.matcher = StopWordMatcher(settings.stop_words)
        self.decoder = ContinuationDecoder(tokenizer, prompt_ids)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.vocab_size = len(tokenizer)
        self.history = list(prompt_ids)  # what the repetition penalty looks at
        self.generator: torch.Generator | None = None
        self.generated: list[int] = []
        self.shown = self.previous_text = ""
        self.first_token_seconds: float | None = None
        self.finished = False

    def step(self, logits: torch.Tensor) -> GenerationUpdate:
        """`logits` is this request's next-token row, shape [vocab]."""
        raw = logits if self.settings.logprobs >= 0 else None
        return self.advance(self.process(logits[None, :])[0], raw)

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply this request's warpers to `logits` rows [n, vocab].

        n > 1 only for rows whose requests share `warper_key`: their warpers are the same function.
        """
        scores = mask_unknown_tokens(logits.float(), self.vocab_size)
        # Only the repetition penalty reads past tokens; skip building them every step otherwise.
        past = self.history if self.settings.repetition_penalty != 1.0 else []
        history = torch.tensor([past] * scores.shape[0], dtype=torch.long, device=scores.device)
        return self.processors(history.view(scores.shape[0], len(past)), scores)

    @property
    def warper_key(self) -> tuple | None:
        """Requests with equal keys can have their warpers applied to a stack of rows at once.

        None when the warpers depend on the request's own tokens (repetition penalty).
        """
        settings = self.settings
        if settings.repetition_penalty != 1.0:
            return None
        if is_greedy(settings):
            return ("greedy",)
        return ("sample", settings.temperature, settings.top_k, settings.top_p)

    def advance(self, scores: torch.Tensor, raw_logits: torch.Tensor | None = None) -> GenerationUpdate:
        """Draw the next token from processed `scores` [vocab] with this request's own RNG; with
        `raw_logits`, the token also reports its log-probabilities under them."""
        scores = scores[None, :]
        if self.generator is None:
            self.generator = make_generator(self.settings.seed, scores.device)
        probs = torch.softmax(scores.float(), dim=-1)  # once, for the draw and for the token's report
        next_id = int(choose_next_token(scores, self.settings, self.generator, probs)[0])
        now = time.perf_counter() - self.started
        if self.first_token_seconds is None:
            self.first_token_seconds = now
        if next_id in self.eos_ids:
            return self._update(now, "eos")
        self.generated.append(next_id)
        self.history.append(next_id)
        last = len(self.generated) >= self.settings.max_new_tokens
        full_text = self.decoder.decode(self.generated)
        token = describe_choice(self.tokenizer, probs[0], next_id, full_text[len(self.previous_text) :])
        if raw_logits is not None:
            token = with_logprobs(token, self.tokenizer, raw_logits, self.vocab_size, self.settings.logprobs)
        self.previous_text = full_text
        cut = self.matcher.feed(full_text, final=last)
        # Never take back what was shown, even if a tokenizer re-decodes earlier text differently.
        if cut.visible.startswith(self.shown):
            self.shown = cut.visible
        if cut.stopped or last:
            return self._update(now, "stop_word" if cut.stopped else "length", token)
        return self._update(now, None, token)

    @property
    def last_token(self) -> int:
        return self.history[-1]

    def _update(self, now: float, finish_reason: str | None, token: TokenChoice | None = None):
        self.finished = finish_reason is not None
        return GenerationUpdate(
            self.shown,
            len(self.generated),
            self.finished,
            finish_reason,
            now,
            self.first_token_seconds,
            token,
        )


def stream_generate(
    model,
    tokenizer,
    prompt_ids: list[int],
    settings: GenerationSettings,
    prefill: Callable[[], Any] | None = None,
    decode_model=None,
) -> Iterator[GenerationUpdate]:
    """Yield an update per decoded token; closing the iterator cancels after the current step.

    `prefill` replaces the first forward pass (a vision model merges image features there) and
    `decode_model` takes the later single-token steps; both default to `model` on `prompt_ids`.
    """
    state = RequestState(model, tokenizer, prompt_ids, settings)
    device = input_device(model)
    if prefill is not None:
        outputs = prefill()
    else:
        outputs = _forward(model, torch.tensor([prompt_ids], dtype=torch.long, device=device), None)
    decode_model = decode_model if decode_model is not None else model
    while True:
        update = state.step(outputs.logits[0, -1, :])
        yield update
        if update.finished:
            return
        next_tensor = torch.tensor([[state.last_token]], dtype=torch.long, device=device)
        outputs = _forward(decode_model, next_tensor, outputs.past_key_values)


def describe_choice(tokenizer, probs: torch.Tensor, token_id: int, piece: str) -> TokenChoice:
    """The chosen token's probability and the likeliest alternatives under `probs` (processed scores'
    softmax)."""
    top = torch.topk(probs, min(ALTERNATIVES_SHOWN, probs.numel()))
    alternatives = tuple(
        (safe_decode(tokenizer, [int(i)]), float(p)) for p, i in zip(top.values, top.indices, strict=True)
    )
    return TokenChoice(token_id, piece, float(probs[token_id]), alternatives)


def with_logprobs(token: TokenChoice, tokenizer, logits: torch.Tensor, vocab_size: int, top: int):
    """`token` with its log-probability and the `top` likeliest tokens' under raw `logits` [vocab]
    (the model's own distribution, before repetition penalty, temperature, top-k and top-p)."""
    logprobs = torch.log_softmax(mask_unknown_tokens(logits.float(), vocab_size), dim=-1)
    best = torch.topk(logprobs, min(top, vocab_size))
    listed = tuple(
        (int(i), safe_decode(tokenizer, [int(i)]), float(v))
        for v, i in zip(best.values, best.indices, strict=True)
    )
    return replace(token, logprob=float(logprobs[token.id]), top_logprobs=listed)


def padded_token_ids(model, tokenizer) -> list[int]:
    """Rows of a padded embedding matrix past the tokenizer: mask_unknown_tokens' ids, for generate()."""
    rows = getattr(model.config.get_text_config(), "vocab_size", None) or 0
    return list(range(len(tokenizer), rows))


def beam_config(model, tokenizer, settings: GenerationSettings) -> GenerationConfig:
    eos = sorted(eos_token_ids(model, tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else None)
    return GenerationConfig(
        do_sample=False,
        num_beams=settings.num_beams,
        max_new_tokens=settings.max_new_tokens,
        repetition_penalty=settings.repetition_penalty,
        early_stopping=True,
        eos_token_id=eos or None,
        pad_token_id=pad,
        stop_strings=list(settings.stop_words) or None,
        suppress_tokens=padded_token_ids(model, tokenizer) or None,
    )


def generate_beam(model, tokenizer, prompt_ids: list[int], settings: GenerationSettings) -> GenerationUpdate:
    """Best beam, whole: transformers cannot stream beam search (TextIteratorStreamer refuses it)."""
    started = time.perf_counter()
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=input_device(model))
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=beam_config(model, tokenizer, settings),
            tokenizer=tokenizer,  # stop_strings needs it
        )
    generated = output[0, len(prompt_ids) :].tolist()
    eos_ids = eos_token_ids(model, tokenizer)
    finish_reason = "length"
    for index, token in enumerate(generated):
        if token in eos_ids:
            generated, finish_reason = generated[:index], "eos"
            break
    text = ContinuationDecoder(tokenizer, prompt_ids).decode(generated)
    cut = StopWordMatcher(settings.stop_words).feed(text, final=True)
    seconds = time.perf_counter() - started
    return GenerationUpdate(
        cut.visible, len(generated), True, "stop_word" if cut.stopped else finish_reason, seconds, seconds
    )
