"""Next-token choice from logits: transformers' warpers, our per-request torch.Generator.

Small pure functions so each can be checked against a hand-made tensor.
"""

from __future__ import annotations

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from backend.settings import GenerationSettings, is_greedy  # is_greedy lives there: remote mode needs it


def build_logits_processor(settings: GenerationSettings) -> LogitsProcessorList:
    """The same warpers, in the same order, that transformers' generate() applies when sampling."""
    processors = Warpers()
    if settings.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty=float(settings.repetition_penalty)))
    if is_greedy(settings):
        return processors
    if settings.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(float(settings.temperature)))
    if settings.top_k > 0 and settings.top_p < 1.0:
        processors.append(TopPWithinTopK(settings.top_k, float(settings.top_p)))
    elif settings.top_k > 0:
        processors.append(TopKLogitsWarper(top_k=settings.top_k))
    elif settings.top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=float(settings.top_p)))
    return processors


class Warpers(LogitsProcessorList):
    """transformers' list of warpers, applied in order. Ours only to skip what its __call__ does first for
    every warper on every token, inspect.signature (about 70 us a token here); these take (input_ids, scores)
    only."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        for processor in self:
            scores = processor(input_ids, scores)
        return scores


class TopPWithinTopK:
    """TopKLogitsWarper then TopPLogitsWarper, with top-p run on the k survivors only.

    Ours because transformers' top-p sorts the whole vocabulary: 5 ms a step for 8 rows of 49k here.
    Same result, except on a tie at the k-th score, where this keeps exactly k and transformers keeps
    every tied token (ties are common with bf16 logits; top-p then usually removes them anyway).
    """

    def __init__(self, top_k: int, top_p: float):
        self.top_k = top_k
        self.top_p = TopPLogitsWarper(top_p=top_p)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        values, indices = scores.topk(min(self.top_k, scores.shape[-1]), dim=-1)
        kept = self.top_p(input_ids, values)
        return torch.full_like(scores, float("-inf")).scatter(-1, indices, kept)


def mask_unknown_tokens(scores: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Embedding matrices are often padded past the tokenizer; never pick an id it cannot decode."""
    if scores.shape[-1] > vocab_size:
        scores = scores.clone()
        scores[..., vocab_size:] = float("-inf")
    return scores


def choose_next_token(
    scores: torch.Tensor,
    settings: GenerationSettings,
    generator: torch.Generator | None,
    probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one id per row of already-processed `scores` (shape [batch, vocab]); `probs`, their softmax, if
    the caller has it already."""
    if is_greedy(settings):
        return scores.argmax(dim=-1)
    if probs is None:
        probs = torch.softmax(scores.float(), dim=-1)
    return torch.stack([draw(row, generator) for row in probs])


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One id from a probability row; where top-k/top-p left few candidates, drawn among those only.

    Ours because torch.multinomial over a whole 49k row took 1.5 ms here (10% of a batched decode
    step) when top-k had left 50 nonzero entries. A mostly nonzero row is drawn whole, exactly as
    generate() draws it: with no top-k/top-p (and a temperature high enough that softmax leaves
    most of the row above 0) the same seed gives generate()'s tokens.
    """
    candidates = probs.nonzero().squeeze(-1)
    if candidates.numel() * 2 > probs.numel():
        return torch.multinomial(probs, num_samples=1, generator=generator)[0]
    return candidates[torch.multinomial(probs[candidates], num_samples=1, generator=generator)[0]]


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """Per-request RNG: another user's request can never shift this one's samples."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
