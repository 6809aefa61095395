"""A backend server's log-probabilities, read into our token records (pure Python: remote mode has no torch).

OpenAI-compatible engines (vLLM, llama.cpp, TGI, SGLang, this app) return, per generated token, its
log-probability and the top alternatives': chat as `logprobs.content[]`, completions as four parallel
lists. They give the colouring of replies, our own /v1 logprobs, and the Inspector in remote mode.
"""

from __future__ import annotations

import math

from backend.settings import GenerationSettings, is_greedy
from backend.token_probs import NextTokens, TokenChoice, TokenProbability, entropy_of, warped

COLOURING_ALTERNATIVES = 3  # asked for on every reply: the colouring's hover lists this many
INSPECTOR_TOKENS = 20  # the most chat's top_logprobs allows; completions' own limit may be lower
COMPLETION_TOKENS = 5  # OpenAI's limit for completions' logprobs (ours too): asked again at this


def logprob_params(chat: bool, count: int) -> dict:
    return {"logprobs": True, "top_logprobs": count} if chat else {"logprobs": count}


def token_choice(
    text: str, logprob: float, top: list[tuple[str, float]], keep: int, utf8: tuple[int, ...] | None = ()
) -> TokenChoice:
    """`keep` < 0: the request did not ask for log-probabilities (they still colour the reply)."""
    listed = top if keep < 0 else top[:keep]
    return TokenChoice(
        utf8=utf8,
        id=-1,
        text=text,
        probability=math.exp(logprob),
        alternatives=tuple((alt, math.exp(lp)) for alt, lp in top[:COLOURING_ALTERNATIVES]),
        logprob=logprob,
        top_logprobs=tuple((-1, alt, lp) for alt, lp in listed),
    )


def tokens_of(choice: dict, chat: bool, keep: int) -> list[TokenChoice]:
    """The tokens one choice of a response (or stream event) reports; [] when it reports none."""
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return []
    if chat:
        return [
            token_choice(
                str(entry.get("token", "")),
                float(entry.get("logprob", -math.inf)),
                [
                    (str(alt.get("token", "")), float(alt.get("logprob", -math.inf)))
                    for alt in entry.get("top_logprobs") or []
                ],
                keep,
                reported_bytes(entry.get("bytes")),
            )
            for entry in logprobs.get("content") or []
            if isinstance(entry, dict)
        ]
    texts = logprobs.get("tokens") or []
    values = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or []
    tokens = []
    for index, (text, value) in enumerate(zip(texts, values, strict=False)):
        top = tops[index] if index < len(tops) and isinstance(tops[index], dict) else {}
        ranked = best_first(top)
        tokens.append(token_choice(str(text), float(value if value is not None else -math.inf), ranked, keep))
    return tokens


def best_first(top: dict) -> list[tuple[str, float]]:
    """A completions-shape {token: logprob} dict as (token, logprob) pairs, likeliest first."""
    return sorted(((str(t), float(lp)) for t, lp in top.items()), key=lambda pair: -pair[1])


def reported_bytes(value) -> tuple[int, ...] | None:
    """A chat logprobs entry's `bytes`: the list as sent, None when the server sent null."""
    return tuple(int(b) for b in value) if isinstance(value, list) else None


def next_tokens_from(top: dict, settings: GenerationSettings, n: int) -> NextTokens:
    """The Inspector's list from a server's top log-probabilities of one next token (completions' shape)."""
    ranked = best_first(top)[:n]
    raw = [math.exp(lp) for _, lp in ranked]
    final = warped(
        [lp for _, lp in ranked], settings.temperature, settings.top_k, settings.top_p, is_greedy(settings)
    )
    note = (
        f"From the backend server's top {len(ranked)} log-probabilities: 'after settings' is computed over "
        f"these {len(ranked)} tokens only, and entropies cover only them"
    )
    if settings.repetition_penalty != 1.0:
        note += "; the repetition penalty is not applied (the server does not say token ids)"
    tokens = [TokenProbability(-1, text, p, f) for (text, _), p, f in zip(ranked, raw, final, strict=True)]
    return NextTokens(tokens, entropy_of(raw), entropy_of(final), note + ".")
