"""What the page adds to Gradio's own behaviour in the browser: a keyboard guard and the phone layout."""

from __future__ import annotations

# Gradio's textboxes send from their own `keypress` listener on Enter (lines=1) and know nothing of input
# methods. The Enter that confirms a CJK composition is not a send: stop it in the capture phase, before
# it reaches them. Safari ends the composition before that keydown, hence keyCode 229 and the flag.
ENTER_GUARD_JS = """
() => {
  if (document.documentElement.dataset.imeGuard) return;
  let composing = false, imeEnter = false;
  document.addEventListener("compositionstart", () => { composing = true; }, true);
  document.addEventListener("compositionend", () => { composing = false; }, true);
  const guard = (event) => {
    if (event.type === "keydown") imeEnter = event.isComposing || event.keyCode === 229 || composing;
    if (event.key === "Enter" && (imeEnter || event.isComposing || composing)) {
      event.stopImmediatePropagation();  // not preventDefault: the input method needs its Enter
    }
  };
  window.addEventListener("keydown", guard, true);
  window.addEventListener("keypress", guard, true);
  document.documentElement.dataset.imeGuard = "on";
}
"""

PAGE_CSS = """
#banner details > summary { cursor: pointer; }
/* The version bar: ◀ 2/3 ▶ together, then what they act on. */
#versions { align-items: center; flex-wrap: nowrap; gap: 0.5em; }
#versions > * { flex: 0 0 auto !important; min-width: 0 !important; width: auto !important; }
#versions > #version-about { flex: 1 1 10em !important; font-size: 0.85em; opacity: 0.85; }
#version-count { font-variant-numeric: tabular-nums; }
#version-previous, #version-next { font-size: 1.1em; }
/* Compare: the settings that differ between A and B. */
.compare-head mark { background: #fde68a; color: inherit; border-radius: 3px; padding: 0 2px; }
.compare-head p { font-size: 0.9em; margin: 0; }
/* Phones: the message box on the first screen (the chat is shorter, the title smaller). */
@media (max-width: 640px) {
  #title h1 { font-size: 1.4em; margin: 0.2em 0; }
  #chatbot { height: 46vh !important; height: 46dvh !important; min-height: 220px !important; }
}
"""
