"""The status banner: loading progress, and a clear warning when the demo model answers."""

from __future__ import annotations

DEMO_HELP = (
    "Replies come from a **tiny demo model with random weights**, so they are gibberish. "
    "To chat with a real model, start the app with `python app.py --model lmsys/vicuna-7b-v1.5` "
    "(a Hub id, downloaded once) or `--model /path/to/model` (a local Hugging Face directory)."
)


def banner_markdown(status, model_name: str, is_demo: bool) -> str:
    """Markdown for the banner; empty when a real model is ready and there is nothing to say."""
    if status.state == "loading":
        progress = f" — {status.fraction:.0%}" if status.fraction is not None else ""
        return f"⏳ **Loading the model…** {status.stage}{progress}. Messages can be sent once it is ready."
    if status.state == "failed":
        return f"❌ **No model could be loaded.** {status.stage}"
    if is_demo:
        reason = f"\n\n_{status.fallback_reason}._" if status.fallback_reason else ""
        return f"⚠️ **Demo mode.** {DEMO_HELP}{reason}"
    return f"✅ Model: `{model_name}`"
