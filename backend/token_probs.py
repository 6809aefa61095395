"""Token probabilities as the UI and the API show them: a generated token's, and the Inspector's list.

Pure Python (no torch), so that the remote mode can fill them from an engine's top log-probabilities.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TokenChoice:
    """One generated token as the sampler saw it, for colouring replies by probability."""

    id: int  # -1 where a backend server does not say
    text: str  # what this token added to the reply
    probability: float  # under the distribution it was drawn from (a backend server's: its own)
    alternatives: tuple[tuple[str, float], ...]  # the likeliest tokens at that step
    # When the request asked for log-probabilities (settings.logprobs >= 0): the chosen token's and the
    # likeliest tokens' (id, text, logprob), under the model's raw distribution (before any warper).
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, str, float], ...] = ()
    # Its bytes, as OpenAI's logprobs report them: () for its text's UTF-8, None where a backend
    # server did not say (llama.cpp sends null).
    utf8: tuple[int, ...] | None = ()


@dataclass(frozen=True)
class TokenProbability:
    id: int
    text: str
    p_raw: float  # plain softmax of the logits (over the tokens the tokenizer has)
    p_final: float  # after repetition penalty, temperature, top-k, top-p; 0 if removed


@dataclass(frozen=True)
class NextTokens:
    tokens: list[TokenProbability]  # by p_raw, highest first
    entropy_raw: float  # nats
    entropy_final: float
    note: str | None = None  # how these numbers were had, when not from the whole distribution

    def to_dict(self) -> dict:
        return asdict(self)


def entropy_of(probabilities: list[float]) -> float:
    return -sum(p * math.log(p) for p in probabilities if p > 0)


def warped(logprobs: list[float], temperature: float, top_k: int, top_p: float, greedy: bool) -> list[float]:
    """Probabilities after temperature, top-k and top-p, over the listed tokens only (renormalised).

    Ours because remote mode has only a backend server's top log-probabilities and imports no torch;
    the order and tie rules follow backend.decode.sampling.
    """
    if not logprobs:
        return []
    order = sorted(range(len(logprobs)), key=lambda i: -logprobs[i])
    if greedy:
        return [1.0 if i == order[0] else 0.0 for i in range(len(logprobs))]
    scaled = [lp / temperature for lp in logprobs]
    kept = order[:top_k] if top_k > 0 else order
    peak = max(scaled[i] for i in kept)
    weights = {i: math.exp(scaled[i] - peak) for i in kept}
    total = sum(weights.values())
    if top_p < 1.0:
        cumulative, nucleus = 0.0, {}
        for i in kept:  # highest first; the token that crosses top_p stays, as TopPLogitsWarper keeps it
            nucleus[i] = weights[i]
            cumulative += weights[i] / total
            if cumulative >= top_p:
                break
        weights, total = nucleus, sum(nucleus.values())
    return [weights.get(i, 0.0) / total for i in range(len(logprobs))]
