"""Text as the Chatbot shows it: typed HTML stays text, and maths (only maths) renders with KaTeX.

Pure functions, no Gradio import. `shown` makes the Chatbot's markdown and `as_typed` undoes it.
"""

from __future__ import annotations

import html
import re

# Maths is found here, in prose, and its delimiters marked with an invisible word joiner; the Chatbot
# renders only marked ones. Gradio alone would pair any two "$" (prices) and any "\(" in code (regexes).
MARK = "\u2060"
LATEX_DELIMITERS = [  # "$$" before "$": KaTeX tries them in this order
    {"left": f"$${MARK}", "right": f"{MARK}$$", "display": True},
    {"left": f"\\[{MARK}", "right": f"{MARK}\\]", "display": True},
    {"left": f"\\({MARK}", "right": f"{MARK}\\)", "display": False},
    {"left": f"${MARK}", "right": f"{MARK}$", "display": False},
]

# Code (fenced blocks and inline spans) is never maths.
CODE = re.compile(r"^ {0,3}(`{3,}|~{3,})[^\n]*\n.*?(?:^ {0,3}\1[ \t]*$|\Z)|(`+).+?\2", re.M | re.S)
# "$…$" by pandoc's rule: no space just inside either "$", no digit just after the closing one. So
# "costs $5 and $10" is text.
MATHS = re.compile(
    r"\$\$(?P<display>.+?)\$\$|\\\[(?P<block>.+?)\\\]|\\\((?P<paren>.+?)\\\)"
    r"|(?<![$\\])\$(?P<inline>[^\s$](?:(?!\n\n)[^$])*?(?<![\s\\]))\$(?!\d)",
    re.S,
)
# Each kind of maths with its delimiters as typed.
TYPED = {"display": ("$$", "$$"), "block": ("\\[", "\\]"), "paren": ("\\(", "\\)"), "inline": ("$", "$")}
MARKED = re.compile(rf"(?<=[$(\[]){MARK}|{MARK}(?=\\?[$)\]])")


def shown(text: str) -> str:
    """Escape so that typed or generated HTML is shown as text, and mark the maths in it for KaTeX."""
    return mark_maths(html.escape(text, quote=False))


def as_typed(content: str) -> str:
    """The text `shown` was given: what the model reads, what an export holds, what an edit sends.

    (A word joiner typed right inside a maths delimiter is the one thing it does not give back.)
    """
    return html.unescape(MARKED.sub("", content))


def mark_maths(markdown: str) -> str:
    pieces, start = [], 0
    for code in CODE.finditer(markdown):
        pieces += [MATHS.sub(marked, markdown[start : code.start()]), code.group()]
        start = code.end()
    return "".join(pieces + [MATHS.sub(marked, markdown[start:])])


def marked(match: re.Match) -> str:
    kind = match.lastgroup
    if not match[kind].strip():
        return match.group()
    left, right = TYPED[kind]
    return f"{left}{MARK}{match[kind]}{MARK}{right}"
