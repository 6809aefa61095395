"""The next-token distribution before and after the warpers, for the Inspector tab and API.

It applies exactly the processors generation uses (backend.decode.sampling), so what it shows is what
sampling would draw from.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from backend.decode.sampling import (
    build_logits_processor,
    choose_next_token,
    is_greedy,
    make_generator,
    mask_unknown_tokens,
)
from backend.models.adapters import rows_using
from backend.models.loading import input_device
from backend.settings import GenerationSettings
from backend.token_probs import NextTokens, TokenProbability

MAX_LISTED_TOKENS = 100
CACHED_CONTEXTS = 8  # moving a slider must not re-run the model over the same text
LISTING_CONTEXT = 8  # ids of context a listed token is decoded after


def entropy(probs: torch.Tensor) -> float:
    nonzero = probs[probs > 0]
    return float(-(nonzero * nonzero.log()).sum())


def final_probabilities(
    logits: torch.Tensor, input_ids: torch.Tensor, settings: GenerationSettings, vocab_size: int
) -> torch.Tensor:
    """The distribution generation samples from (one-hot for greedy), shape [vocab]."""
    scores = build_logits_processor(settings)(input_ids, mask_unknown_tokens(logits[None, :], vocab_size))[0]
    if is_greedy(settings):
        one_hot = torch.zeros_like(scores)
        one_hot[scores.argmax()] = 1.0
        return one_hot
    return torch.softmax(scores, dim=-1)


def token_after(tokenizer, ids: list[int], token_id: int) -> str:
    """The text token `token_id` adds after `ids` (decoded alone, a SentencePiece token loses its space)."""
    before = tokenizer.decode(ids, skip_special_tokens=False)
    return tokenizer.decode(ids + [token_id], skip_special_tokens=False)[len(before) :]


class Inspector:
    """Owns a small per-model cache of last-position logits; safe to share between requests."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self._cache: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def logits(self, ids: list[int], adapter: str = "") -> torch.Tensor:
        key = (adapter, *ids)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        with torch.inference_mode(), rows_using([adapter]):
            tensor = torch.tensor([ids], dtype=torch.long, device=input_device(self.model))
            logits = self.model(input_ids=tensor).logits[0, -1].float().cpu()
        with self._lock:
            self._cache[key] = logits
            while len(self._cache) > CACHED_CONTEXTS:
                self._cache.popitem(last=False)
        return logits

    def next_tokens(self, ids: list[int], settings: GenerationSettings, n: int) -> NextTokens:
        n = max(1, min(n, MAX_LISTED_TOKENS))
        logits = self.logits(ids, settings.adapter)
        # Over the tokens the tokenizer has: a padded embedding's extra rows are never drawn (nor listed).
        p_raw = torch.softmax(mask_unknown_tokens(logits, len(self.tokenizer)), dim=-1)
        p_final = final_probabilities(logits, torch.tensor([ids]), settings, len(self.tokenizer))
        top = torch.topk(p_raw, min(n, p_raw.numel()))
        tokens = [
            TokenProbability(int(i), self.listed_text(ids, int(i)), float(p), float(p_final[i]))
            for p, i in zip(top.values, top.indices, strict=True)
        ]
        return NextTokens(tokens, entropy(p_raw), entropy(p_final))

    def listed_text(self, ids: list[int], token_id: int) -> str:
        """How `token_id` reads after `ids`: "▁the" lists as " the", as a click appends it. The last few
        ids are context enough for the space and cost little for every listed token."""
        return token_after(self.tokenizer, [int(i) for i in ids[-LISTING_CONTEXT:]], token_id)

    def step(self, ids: list[int], settings: GenerationSettings) -> int:
        """The token generation would pick next: argmax, or a draw seeded by (seed, position)."""
        logits = self.logits(ids, settings.adapter)
        scores = build_logits_processor(settings)(
            torch.tensor([ids]), mask_unknown_tokens(logits[None, :], len(self.tokenizer))
        )
        generator = make_generator(max(settings.seed, 0) + len(ids), scores.device)
        return int(choose_next_token(scores, settings, generator)[0])
