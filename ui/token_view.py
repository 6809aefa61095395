"""A reply coloured by each token's probability; hovering shows the alternatives. Pure HTML."""

from __future__ import annotations

import html

NOT_AVAILABLE = "<p class='tokens-empty'>Token probabilities are not available for beam search.</p>"


def probability_colour(probability: float) -> str:
    """Red for unlikely picks, through yellow, to green for near-certain ones."""
    hue = 120 * max(0.0, min(probability, 1.0))
    return f"hsl({hue:.0f}, 75%, 82%)"


def token_title(token) -> str:
    alternatives = ", ".join(f"{text!r} {p:.3f}" for text, p in token.alternatives)
    return f"{token.text!r} p={token.probability:.3f} · top: {alternatives}"


def tokens_html(tokens, visible_text: str) -> str:
    """Spans for the tokens that make up `visible_text` (the reply may be cut at a stop word)."""
    if not tokens:
        return NOT_AVAILABLE if visible_text else ""
    full = "".join(token.text for token in tokens)
    start = full.find(visible_text) if visible_text else 0
    end = max(start, 0) + len(visible_text)
    spans, position = [], 0
    for token in tokens:
        piece = token.text[: max(0, end - position)]
        position += len(token.text)
        if not piece:
            break
        spans.append(
            f'<span class="tok" style="background:{probability_colour(token.probability)}" '
            f'title="{html.escape(token_title(token))}">{html.escape(piece)}</span>'
        )
    legend = "<p class='tokens-legend'>Colour: each token's probability when drawn (hover for details).</p>"
    return f"<div class='tokens'>{''.join(spans)}</div>{legend}"
