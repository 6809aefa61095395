"""The Inspector's picture: one row per token, raw and final probability as bars. Pure HTML.

Each row carries its token's id and raw text, so that a click on it can append exactly that token.
"""

from __future__ import annotations

import html

WHITESPACE_SIGNS = {" ": "␣", "\n": "↵", "\t": "⇥"}


def visible_token(text: str) -> str:
    """Show whitespace so that ' the' and 'the' can be told apart."""
    return "".join(WHITESPACE_SIGNS.get(char, char) for char in text) or "∅"


def bar(width: float, kind: str) -> str:
    return f'<div class="bar {kind}" style="width:{max(0.0, min(width, 1.0)) * 100:.1f}%"></div>'


def token_title(token_id: int) -> str:
    return f"id {token_id}" if token_id >= 0 else "the backend server does not say token ids"


def distribution_html(result: dict) -> str:
    """`result` is NextTokens.to_dict(); removed tokens (p_final 0) are struck through.

    Bars are scaled to the largest probability listed, so that near-uniform rows still differ.
    """
    rows = []
    scale = max((max(t["p_raw"], t["p_final"]) for t in result["tokens"]), default=1.0) or 1.0
    for token in result["tokens"]:
        removed = token["p_final"] == 0.0 and token["p_raw"] > 0.0
        label = html.escape(visible_token(token["text"]))
        note = ' <span class="removed-note">removed</span>' if removed else ""
        bars = bar(token["p_raw"] / scale, "raw") + bar(token["p_final"] / scale, "final")
        # The raw text and id ride along for the click that appends this token (ui.inspector_tab.PICK_JS).
        raw = html.escape(token["text"], quote=True)
        pick = f'data-token-id="{int(token["id"])}" data-token-text="{raw}"'
        rows.append(
            f'<tr class="{"removed" if removed else "kept"}" {pick} tabindex="0">'
            f'<td class="token" title="{token_title(token["id"])}"><code>{label}</code>{note}</td>'
            f'<td class="bars">{bars}</td>'
            f'<td class="num">{token["p_raw"]:.3f}</td><td class="num">{token["p_final"]:.3f}</td></tr>'
        )
    header = "<tr><th>token</th><th></th><th>raw</th><th>after warpers</th></tr>"
    entropy = (
        f'<p class="entropy">Entropy (nats): raw {result["entropy_raw"]:.3f} · '
        f"after warpers {result['entropy_final']:.3f}</p>"
    )
    source = f'<p class="source-note">{html.escape(result["note"])}</p>' if result.get("note") else ""
    return f'<table class="inspector">{header}{"".join(rows)}</table>{entropy}{source}'
