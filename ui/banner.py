"""The status banner: loading progress, and a clear warning when a demo model answers."""

from __future__ import annotations

DEMO_HELP = (
    "Replies come from **tiny demo models with random weights**, so they are gibberish. To use real "
    "models, start the app with e.g. `python app.py --model lmsys/vicuna-7b-v1.5 --vision-model "
    "Salesforce/blip2-opt-2.7b` (Hub ids, downloaded once) or `--model /path/to/model` (a local "
    "Hugging Face directory)."
)


KERNEL_LINES = {
    "building": "⏳ Building faster CPU kernels for the {role} model (once, cached); it answers meanwhile.",
    "ready": "⏳ Faster CPU kernels for the {role} model are built: they take over before its next reply.",
    "on": "⚡ Faster CPU kernels on for the {role} model.",
}


def demo_warning(roles: list[str], reasons: list[str]) -> str:
    """One line that says it all, the help folded under it so that it never pushes the chat off a phone."""
    summary = (
        f"⚠️ <b>Demo mode ({' and '.join(roles)})</b>: the replies are gibberish. "
        "Why, and how to use real models"
    )
    body = "\n\n".join([DEMO_HELP, *reasons])
    return f"<details><summary>{summary}</summary>\n\n{body}\n\n</details>"


def banner_markdown(models: list[tuple[str, object]]) -> str:
    """Markdown for the banner from (role, ModelHolder) pairs, e.g. ("chat", holder).

    Each mark also says its meaning in words: without an emoji font it shows as an empty box.
    """
    lines, demo_roles, reasons = [], [], []
    for role, holder in models:
        status = holder.status()
        if status.state == "loading":
            progress = f" — {status.fraction:.0%}" if status.fraction is not None else ""
            lines.append(f"⏳ **Loading the {role} model…** {status.stage}{progress}.")
        elif status.state == "failed":
            lines.append(f"✗ **The {role} model could not be loaded.** {status.stage}")
        elif holder.is_demo:
            demo_roles.append(role)
            if status.fallback_reason:
                reasons.append(f"_{status.fallback_reason}._")
        else:
            lines.append(f"✓ {role.capitalize()} model ready: `{holder.loaded_name}`")
        if status.state == "ready" and getattr(status, "note", None):
            lines.append(f"⚠️ {status.note}")
        kernels = getattr(holder, "kernels_state", lambda: None)()  # local models on AVX-512 CPUs
        if kernels in KERNEL_LINES:
            lines.append(KERNEL_LINES[kernels].format(role=role))
    if demo_roles:
        lines.insert(0, demo_warning(demo_roles, reasons))
    return "\n\n".join(lines)
