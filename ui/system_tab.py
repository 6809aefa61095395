"""The System tab: which model answers, how it was loaded, where its parts sit, and live engine numbers."""

from __future__ import annotations

import html

import gradio as gr
import pandas as pd

from backend.errors import UserError
from backend.request_stats import WINDOW_SECONDS

# Bar colours: weights, room kept for the KV cache and activations.
WEIGHTS_COLOUR, RESERVED_COLOUR, OVER_COLOUR = "#3b82f6", "#f59e0b", "#dc2626"


def queue_length(demo: gr.Blocks) -> int | None:
    """Requests waiting in Gradio's queue. Private attributes: None if Gradio changes them."""
    try:
        queues = demo._queue.event_queue_per_concurrency_id.values()
        return sum(len(queue.queue) for queue in queues)
    except AttributeError:
        return None


def model_markdown(holder, decode_path: str | None = None) -> str:
    status = holder.status()
    if status.state != "ready":
        return f"**Model:** {status.stage}"
    info = holder.info()
    lines = [
        f"**Model:** `{info.name}`{' (built-in demo, random weights)' if info.is_demo else ''}",
        f"**Files:** `{info.location}`",
        f"**Quantization:** {info.quantization} · **dtype:** {info.dtype}"
        f" · **context window:** {info.context_window} tokens · **loaded in** {info.load_seconds:.1f} s",
        f"**Placed on:** {', '.join(info.places)}",
    ]
    if info.kernels:
        lines.append(f"**Kernels:** {info.kernels}")
    if decode_path:  # known once the engine has served a request
        lines.append(f"**Decode step:** {decode_path}")
    lines += [f"⚠️ {note}" for note in info.notes]
    return "\n\n".join(lines)


def size_text(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 2**10:.1f} KiB" if n else "0 B"


def device_html(device: dict) -> str:
    """One device: a bar of weights and reserved room against the budget, a mark at the memory in use now,
    and which modules of which model sit there."""
    budget = max(device["budget_bytes"], 1)
    weights, reserved, in_use = device["planned_bytes"], device["reserved_bytes"], device.get("in_use_bytes")
    colour = OVER_COLOUR if weights + reserved > device["budget_bytes"] else WEIGHTS_COLOUR
    weights_pct = min(100.0, 100 * weights / budget)
    reserved_pct = min(100.0 - weights_pct, 100 * reserved / budget)
    numbers = (
        f"budget {size_text(device['budget_bytes'])} · weights {size_text(weights)} · "
        f"reserved {size_text(reserved)}"
        + (f" · in use now {size_text(in_use)}" if in_use is not None else "")
    )
    mark = ""
    if in_use is not None:
        left = min(100.0, 100 * in_use / budget)
        mark = (
            f'<div title="in use now: {size_text(in_use)}" style="position:absolute;left:{left:.1f}%;'
            'top:-3px;bottom:-3px;width:2px;background:#111827"></div>'
        )
    bar = (
        '<div style="position:relative;display:flex;height:16px;background:#e5e7eb;border-radius:4px">'
        f'<div title="weights" style="width:{weights_pct:.1f}%;background:{colour};'
        'border-radius:4px 0 0 4px"></div>'
        f'<div title="reserved: KV cache and activations" style="width:{reserved_pct:.1f}%;'
        f'background:{RESERVED_COLOUR}"></div>{mark}</div>'
    )
    parts = "".join(
        f"<li><b>{html.escape(m['role'])}</b> <code>{html.escape(m['name'])}</code>: "
        f"{html.escape(', '.join(m['parts']))}</li>"
        for m in device["models"]
    )
    return (
        f'<div class="plan-device" style="margin:0.6em 0"><div><b>{html.escape(device["label"])}</b> '
        f'<span style="opacity:0.8">{numbers}</span></div>{bar}'
        f'<ul style="margin:0.3em 0 0 1.2em">{parts}</ul></div>'
    )


def plan_html(report: dict | None) -> str:
    """The device plan as a picture (backend's plain data from `LoadedModel.system_report()`)."""
    if not report:
        return ""
    verdict = "✓ Fits" if report["fits"] else "✗ Does not fit: some parts go to disk"  # words: no emoji font
    legend = (
        f'<span style="color:{WEIGHTS_COLOUR}">■</span> weights '
        f'<span style="color:{RESERVED_COLOUR}">■</span> reserved for KV cache and activations '
        "<b>|</b> in use now (CPU: this process's resident memory)"
    )
    warnings = "".join(f"<li>⚠️ {html.escape(w)}</li>" for w in report["warnings"])
    return (
        f'<div id="device-plan"><p><b>Device plan</b>: {verdict}<br><small>{legend}</small></p>'
        + "".join(device_html(d) for d in report["devices"])
        + (f'<ul class="plan-warnings">{warnings}</ul>' if warnings else "")
        + "</div>"
    )


def stats_markdown(snapshot, waiting: int | None, kv_usage: tuple[int, int | None] | None = None) -> str:
    queue = "unknown" if waiting is None else str(waiting)
    text = (
        f"**Active requests:** {snapshot.active_requests} · **waiting in queue:** {queue} · "
        f"**aggregate:** {snapshot.tokens_per_second:.1f} tok/s (last 10 s) · "
        f"**finished:** {snapshot.finished_requests} · **cancelled:** {snapshot.cancelled_requests} · "
        f"**failed:** {snapshot.failed_requests}"
    )
    if kv_usage is not None:
        used, capacity = kv_usage
        held = f"{used:,} of {capacity:,} tokens ({used / capacity:.0%})" if capacity else f"{used:,} tokens"
        text += f" · **KV cache in use:** {held}"
    return text


def history_frame(snapshot) -> pd.DataFrame:
    rows = snapshot.history or [(0.0, 0.0)]
    return pd.DataFrame({"seconds ago": [-ago for ago, _ in rows], "tokens/s": [tps for _, tps in rows]})


def axis_limits(snapshot) -> dict[str, list[float]]:
    """Fixed axes for the chart: left to itself, an idle chart's all-zero axes read "0.000000"."""
    peak = max((tps for _, tps in snapshot.history), default=0.0)
    return {"x_lim": [1.0 - WINDOW_SECONDS, 0.0], "y_lim": [0.0, max(1.0, peak)]}


def build_model_switch(role: str, holder) -> gr.events.Dependency | None:
    """A dropdown of the models allowed at launch and a Switch button; None when there is no choice."""
    choices = list(holder.choices)
    if len(choices) < 2:
        return None
    with gr.Row():
        model = gr.Dropdown(
            choices,
            value=choices[0],  # the model configured at launch
            label=f"{role.capitalize()} model",
            elem_id=f"switch-{role}-model",
        )
        button = gr.Button(f"Switch {role} model", elem_id=f"switch-{role}", scale=0)

    def switch(name: str) -> None:
        try:
            holder.switch(name)
        except UserError as error:
            raise gr.Error(str(error), print_exception=False) from None
        gr.Info(f"Switching the {role} model to {name}; the banner shows the progress.")

    return button.click(switch, model, None, api_visibility="private")  # queued: gr.Info needs it


def build_system_tab(demo: gr.Blocks, service, vision_holder=None) -> list[gr.events.Dependency]:
    """Call inside a gr.Tabs context. Returns the model switch events, for the banner to follow."""
    with gr.Tab("System", id="system"):
        switches = [build_model_switch("chat", service.holder)]
        if vision_holder is not None:
            switches.append(build_model_switch("vision", vision_holder))
        model_info = gr.Markdown(elem_id="system-model")
        plan = gr.HTML(elem_id="system-plan")
        stats = gr.Markdown(elem_id="system-stats")
        snapshot = service.stats.snapshot()
        plot = gr.LinePlot(
            history_frame(snapshot),
            x="seconds ago",
            y="tokens/s",
            **axis_limits(snapshot),
            title=f"Generated tokens per second (last {WINDOW_SECONDS // 60} minutes)",
            height=220,
            elem_id="system-plot",
        )

    def refresh():
        snapshot = service.stats.snapshot()
        return (
            model_markdown(service.holder, service.decode_path()),
            plan_html(service.holder.plan_report()),
            stats_markdown(snapshot, queue_length(demo), service.kv_usage()),
            gr.LinePlot(history_frame(snapshot), **axis_limits(snapshot)),
        )

    outputs = [model_info, plan, stats, plot]
    timer = gr.Timer(2.0)
    timer.tick(refresh, None, outputs, api_visibility="private", queue=False)
    demo.load(refresh, None, outputs, api_visibility="private", queue=False)
    return [event for event in switches if event is not None]
