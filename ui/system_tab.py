"""The System tab: which model answers, how it was loaded, and live engine numbers."""

from __future__ import annotations

import gradio as gr
import pandas as pd


def queue_length(demo: gr.Blocks) -> int | None:
    """Requests waiting in Gradio's queue. Private attributes: None if Gradio changes them."""
    try:
        queues = demo._queue.event_queue_per_concurrency_id.values()
        return sum(len(queue.queue) for queue in queues)
    except AttributeError:
        return None


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def model_markdown(holder) -> str:
    status = holder.status()
    if status.state != "ready":
        return f"**Model:** {status.stage}"
    loaded = holder.get()
    places = sorted({str(device) for device in loaded.plan.device_map.values()})
    lines = [
        f"**Model:** `{holder.loaded_name}`{' (built-in demo, random weights)' if loaded.is_demo else ''}",
        f"**Files:** `{loaded.path}`",
        f"**Quantization:** {loaded.spec.quantization} · **dtype:** {dtype_name(loaded.dtype)}"
        f" · **context window:** {loaded.context_window} tokens · **loaded in** {loaded.load_seconds:.1f} s",
        f"**Placed on:** {', '.join(places)}",
    ]
    lines += [f"⚠️ {note}" for note in loaded.notes]
    return "\n\n".join(lines)


def stats_markdown(snapshot, waiting: int | None) -> str:
    queue = "unknown" if waiting is None else str(waiting)
    return (
        f"**Active requests:** {snapshot.active_requests} · **waiting in queue:** {queue} · "
        f"**aggregate:** {snapshot.tokens_per_second:.1f} tok/s (last 10 s) · "
        f"**finished:** {snapshot.finished_requests} · **cancelled:** {snapshot.cancelled_requests} · "
        f"**failed:** {snapshot.failed_requests}"
    )


def history_frame(snapshot) -> pd.DataFrame:
    rows = snapshot.history or [(0.0, 0.0)]
    return pd.DataFrame({"seconds ago": [-ago for ago, _ in rows], "tokens/s": [tps for _, tps in rows]})


def build_system_tab(demo: gr.Blocks, service) -> None:
    """Call inside a gr.Tabs context."""
    with gr.Tab("System", id="system"):
        model_info = gr.Markdown(elem_id="system-model")
        stats = gr.Markdown(elem_id="system-stats")
        plot = gr.LinePlot(
            history_frame(service.stats.snapshot()),
            x="seconds ago",
            y="tokens/s",
            title="Generated tokens per second (last 2 minutes)",
            height=220,
            elem_id="system-plot",
        )

    def refresh():
        snapshot = service.stats.snapshot()
        return (
            model_markdown(service.holder),
            stats_markdown(snapshot, queue_length(demo)),
            history_frame(snapshot),
        )

    timer = gr.Timer(2.0)
    timer.tick(refresh, None, [model_info, stats, plot], api_visibility="private", queue=False)
    demo.load(refresh, None, [model_info, stats, plot], api_visibility="private", queue=False)
