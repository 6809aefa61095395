"""Presets kept in the browser, and a link that sets up the page: the Gradio side of ui.presets."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from backend.errors import InvalidSettings, UserError
from backend.settings import ServerLimits
from ui.handlers import report
from ui.presets import (
    BUILT_IN,
    MAX_PRESETS,
    built_in,
    check_name,
    checked_values,
    presets_file,
    read_presets_file,
    read_setup,
    setup_query,
    stored_presets,
)

STORAGE_KEY = "chat-caption-playground-presets"
# gr.BrowserState encrypts in the browser with a key it sends there: not a secret, but a fixed one keeps
# the presets readable after the server restarts (a random one per start would lose them).
STORAGE_KEY_SECRET = "chat-caption-playground-presets-v1"
# The server returns the query; the page puts its own address in front, so a link names this server only.
LINK_JS = "(query) => query ? window.location.origin + window.location.pathname + '?' + query : ''"


@dataclass(frozen=True)
class PresetsPanel:
    stored: gr.BrowserState
    choice: gr.Dropdown
    load: gr.Button
    delete: gr.Button
    name: gr.Textbox
    save: gr.Button
    export: gr.Button
    exported: gr.File
    upload: gr.UploadButton
    make_link: gr.Button
    link: gr.Textbox


def choices(user_names) -> list[tuple[str, str]]:
    return [(f"{name} (built in)", name) for name in BUILT_IN] + [(name, name) for name in user_names]


def build_presets_panel() -> PresetsPanel:
    """Call where the panel goes (the settings column)."""
    stored = gr.BrowserState({}, storage_key=STORAGE_KEY, secret=STORAGE_KEY_SECRET)
    with gr.Accordion("Presets and links", open=False, elem_id="presets"):
        choice = gr.Dropdown(choices([]), value=None, label="Preset", elem_id="preset-choice")
        with gr.Row():
            load = gr.Button("Load", size="sm", elem_id="preset-load", min_width=60)
            delete = gr.Button("Delete", size="sm", elem_id="preset-delete", min_width=60)
        name = gr.Textbox(
            label="Save as a preset named",
            placeholder="A name; Enter saves",
            lines=1,
            max_lines=1,
            elem_id="preset-name",
        )
        save = gr.Button("Save preset", size="sm", elem_id="preset-save")
        with gr.Row():
            export = gr.Button("Export presets", size="sm", elem_id="preset-export", min_width=60)
            upload = gr.UploadButton(
                "Import presets", file_types=[".json"], size="sm", elem_id="preset-import", min_width=60
            )
        exported = gr.File(label="Exported presets", visible=False, elem_id="presets-exported")
        make_link = gr.Button("Link to this setup", size="sm", elem_id="setup-link-make")
        link = gr.Textbox(
            label="Link to this setup",
            info="Opens this page with these settings and this message. A seed of -1 draws anew each time.",
            buttons=["copy"],
            interactive=False,
            elem_id="setup-link",
        )
    return PresetsPanel(stored, choice, load, delete, name, save, export, exported, upload, make_link, link)


def check_fits(values: dict[str, Any], controls: dict) -> dict[str, Any]:
    """The values these controls can show: a slider's range, a choice offered; a control this server keeps
    at a fixed value (a remote engine without it) is left as it is."""
    fitting = {}
    for name, value in values.items():
        control = controls[name]
        if control.interactive is False:
            continue
        if isinstance(control, gr.Slider) and not control.minimum <= value <= control.maximum:
            raise InvalidSettings(name, f"must be between {control.minimum:g} and {control.maximum:g} here")
        offered = [choice[1] for choice in getattr(control, "choices", None) or []]
        if isinstance(control, (gr.Radio, gr.Dropdown)) and value not in offered:
            raise InvalidSettings(name, f"{value!r} is not offered on this server")
        fitting[name] = value
    return fitting


def wire_presets(
    demo: gr.Blocks, panel: PresetsPanel, controls: dict, message: gr.MultimodalTextbox, limits: ServerLimits
) -> None:
    names = list(controls)
    private = {"api_visibility": "private"}
    unchanged = [gr.skip()] * len(names)

    def current(data) -> dict[str, Any]:
        return {name: data[controls[name]] for name in names}

    def on_save(data):
        try:
            name = check_name(data[panel.name])
            values = checked_values(current(data), limits)
            presets = stored_presets(data[panel.stored], limits)
            if name not in presets and len(presets) >= MAX_PRESETS:
                raise UserError(f"At most {MAX_PRESETS} presets: delete one first.")
        except UserError as error:
            report(error)
            return gr.skip(), gr.skip(), gr.skip()
        presets[name] = values
        gr.Info(f"Saved the preset '{name}' in this browser.")
        return presets, gr.Dropdown(choices=choices(presets), value=name), ""

    def on_load(data):
        name, presets = data[panel.choice], stored_presets(data[panel.stored], limits)
        try:
            if name in BUILT_IN:
                values = built_in(name, limits)
            elif name in presets:
                values = presets[name]
            else:
                raise UserError("Choose a preset to load first.")
            fitting = check_fits(checked_values(values, limits), controls)
        except UserError as error:
            report(error)
            return unchanged
        return [fitting.get(field, gr.skip()) for field in names]

    def on_delete(data):
        name, presets = data[panel.choice], stored_presets(data[panel.stored], limits)
        if name in BUILT_IN or name not in presets:
            why = (
                "Built-in presets cannot be deleted." if name in BUILT_IN else "Choose a saved preset first."
            )
            report(UserError(why))
            return gr.skip(), gr.skip()
        del presets[name]
        return presets, gr.Dropdown(choices=choices(presets), value=None)

    def on_export(stored):
        presets = stored_presets(stored, limits)
        if not presets:
            report(UserError("No saved presets to export yet: save one first."))
            return gr.skip()
        folder = Path(tempfile.mkdtemp(prefix="playground-presets-"))
        file = folder / f"presets-{time.strftime('%Y%m%d-%H%M%S')}.json"
        file.write_text(json.dumps(presets_file(presets), ensure_ascii=False, indent=2), encoding="utf-8")
        return gr.File(value=str(file), visible=True)

    def on_import(file, stored):
        try:
            imported = read_presets_file(Path(file).read_bytes(), limits) if file else {}
            presets = {**stored_presets(stored, limits), **imported}
            if len(presets) > MAX_PRESETS:
                raise UserError(f"That would make more than {MAX_PRESETS} presets: delete some first.")
        except (UserError, OSError) as error:
            report(error if isinstance(error, UserError) else UserError(f"Could not read the file: {error}"))
            return gr.skip(), gr.skip()
        gr.Info(f"Imported {len(imported)} preset{'s' if len(imported) != 1 else ''}.")
        return presets, gr.Dropdown(choices=choices(presets))

    def on_link(data) -> str:
        text = (data[message] or {}).get("text") or ""
        try:
            return setup_query(current(data), text, limits)
        except UserError as error:
            report(error)
            return ""

    def on_open(request: gr.Request):
        parameters = dict(request.query_params) if request is not None else {}
        try:
            values, text = read_setup(parameters, limits)
            values = check_fits(values, controls)
        except UserError as error:
            report(UserError(f"The link's setup was not applied: {error}"))
            return [*unchanged, gr.skip()]
        box = {"text": text, "files": []} if text is not None else gr.skip()
        return [*[values.get(field, gr.skip()) for field in names], box]

    inputs = {panel.name, panel.stored} | set(controls.values())
    for trigger in (panel.save.click, panel.name.submit):
        trigger(on_save, inputs, [panel.stored, panel.choice, panel.name], **private)
    panel.load.click(on_load, {panel.choice, panel.stored}, list(controls.values()), **private)
    panel.delete.click(on_delete, {panel.choice, panel.stored}, [panel.stored, panel.choice], **private)
    panel.export.click(on_export, panel.stored, panel.exported, **private)
    panel.upload.upload(on_import, [panel.upload, panel.stored], [panel.stored, panel.choice], **private)
    panel.make_link.click(on_link, set(controls.values()) | {message}, panel.link, **private).then(
        None, panel.link, panel.link, js=LINK_JS, **private
    )
    demo.load(
        lambda stored: gr.Dropdown(choices=choices(stored_presets(stored, limits))),
        panel.stored,
        panel.choice,
        **private,
    )
    demo.load(on_open, None, [*controls.values(), message], **private)
