"""The VSF accordion: built the same way on gradio 3.41 (A1111, reForge) and 4.40 (Forge, Neo).

`build(gr, InputAccordion, is_img2img)` returns `UIParts`: the components in `UI_ARGS` order (what
the script's `ui()` returns) and the `infotext_fields` pairs. Only APIs common to both gradio majors
are used (`gr.update`, `Slider`, `Dropdown`, `Checkbox`, `Image(type="pil", image_mode="RGB")`, `Row`,
`.change(fn, inputs, outputs)`), and
the event wiring is guarded: with `--nowebui` the host may call `ui()` outside a `gr.Blocks` context,
where gradio 4 refuses listeners; the components are still created and returned, which is all the API
needs (their values are the defaults for missing API args).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ..settings import CUSTOM_PRESET, METHOD_LABELS, PRESETS, RANGES, VSFSettingsError
from . import infotext
from .args import PRESET_CHOICES, SCRIPT_TITLE, UI_ARGS, UI_DEFAULTS, method_key

log = logging.getLogger("vsf")

TITLE = SCRIPT_TITLE
ELEM_PREFIX = "vsf"
LABELS = {
    "method": "Method",
    "preset": "Preset",
    "alpha": "Alpha (negative strength)",
    "beta": "Beta (negative bias)",
    "lambda": "Flux lambda (negative extrapolation)",
    "start": "Start (fraction of steps)",
    "end": "End (fraction of steps)",
    "single_pass": "Single pass (replace CFG)",
    "show_map": "Show where the negative acts",
    "negative_image": "Negative image (Flux Kontext, Qwen-Image-Edit)",
}
# name: (minimum, maximum, step). The range is the one the settings accept (`settings.RANGES`), the same
# for the API, so every value an image was made with fits the slider when its infotext is pasted.
SLIDERS = {name: (*RANGES["flux_lambda" if name == "lambda" else name], step)
           for name, step in (("alpha", 0.05), ("beta", 0.01), ("lambda", 0.1), ("start", 0.01), ("end", 0.01))}


@dataclass
class UIParts:
    """What `build` made: `components` in `UI_ARGS` order and `infotext_fields` for the script."""

    components: list[Any]
    infotext_fields: list[tuple[Any, Any]] = field(default_factory=list)
    by_name: dict[str, Any] = field(default_factory=dict)


def elem_id(name: str, is_img2img: bool) -> str:
    """`vsf_<tab>_<control>`: the element id the tooltips (javascript/vsf_tooltips.js) key on."""
    return f"{ELEM_PREFIX}_{'img2img' if is_img2img else 'txt2img'}_{name}"


def preset_values(preset: str, method_label: str, alpha: float, beta: float) -> tuple[Any, Any, Any]:
    """(method label, alpha, beta) a preset puts into the sliders; `Custom` keeps the current ones, and so
    does `Model default` (its numbers depend on the model loaded when sampling starts; the sliders are
    not used until one is moved, which shows `Custom`)."""
    if preset not in PRESETS:
        return method_label, alpha, beta
    settings = PRESETS[preset]
    return METHOD_LABELS[settings.method], settings.alpha, settings.beta


def preset_for(method_label: str, alpha: float, beta: float, current: str) -> str:
    """The preset whose method, alpha and beta the controls now hold (the current one first), or
    `Custom`. Tau has no control, so it is not compared."""
    try:
        key, numbers = method_key(method_label), (float(alpha), float(beta))
    except (VSFSettingsError, TypeError, ValueError):
        return CUSTOM_PRESET
    names = ([current] if current in PRESETS else []) + [n for n in PRESETS if n != current]
    for name in names:
        if PRESETS[name].method == key and (PRESETS[name].alpha, PRESETS[name].beta) == numbers:
            return name
    return CUSTOM_PRESET


def build(gr: Any, input_accordion: Any, is_img2img: bool) -> UIParts:
    """Create the accordion and its controls (see the module docstring)."""
    d = UI_DEFAULTS
    with input_accordion(d["enabled"], label=TITLE, elem_id=elem_id("enabled", is_img2img)) as enabled:
        with gr.Row():
            method = gr.Dropdown(label=LABELS["method"], choices=list(METHOD_LABELS.values()), value=d["method"],
                                 elem_id=elem_id("method", is_img2img))
            preset = gr.Dropdown(label=LABELS["preset"], choices=PRESET_CHOICES, value=d["preset"],
                                 elem_id=elem_id("preset", is_img2img))
        sliders = {}
        with gr.Row():
            for name in ("alpha", "beta", "lambda"):
                low, high, step = SLIDERS[name]
                sliders[name] = gr.Slider(label=LABELS[name], minimum=low, maximum=high, step=step, value=d[name],
                                          elem_id=elem_id(name, is_img2img))
        with gr.Row():
            for name in ("start", "end"):
                low, high, step = SLIDERS[name]
                sliders[name] = gr.Slider(label=LABELS[name], minimum=low, maximum=high, step=step, value=d[name],
                                          elem_id=elem_id(name, is_img2img))
            single_pass = gr.Checkbox(label=LABELS["single_pass"], value=d["single_pass"],
                                      elem_id=elem_id("single_pass", is_img2img))
        with gr.Row():  # one map image per output, never a change to the image (runner.add_map_image)
            show_map = gr.Checkbox(label=LABELS["show_map"], value=d["show_map"],
                                   elem_id=elem_id("show_map", is_img2img))
        with gr.Row():  # optional; refused for models without reference images (runner.start)
            negative_image = gr.Image(label=LABELS["negative_image"], value=d["negative_image"], type="pil",
                                      image_mode="RGB", elem_id=elem_id("negative_image", is_img2img))

    by_name = {"enabled": enabled, "method": method, "preset": preset, **sliders, "single_pass": single_pass,
               "show_map": show_map, "negative_image": negative_image}
    components = [by_name[name] for name in UI_ARGS]
    _wire_events(gr, by_name)
    fields = [(by_name[name], getter) for name, getter in infotext.paste_fields()]
    return UIParts(components, fields, by_name)


def fallback_accordion(gr: Any):
    """An `InputAccordion` substitute for hosts without `modules.ui_components.InputAccordion`: a
    closed accordion holding an "Enable" checkbox, which is the value the script receives."""

    class CheckboxAccordion:
        def __init__(self, value, label=None, elem_id=None, **kwargs):
            self.value, self.label, self.elem_id = value, label, elem_id
            self.accordion = gr.Accordion(label=label, open=False, elem_id=elem_id)
            self.checkbox = None

        def __enter__(self):
            self.accordion.__enter__()
            self.checkbox = gr.Checkbox(value=self.value, label=f"Enable {self.label}",
                                        elem_id=f"{self.elem_id}-checkbox" if self.elem_id else None)
            return self.checkbox

        def __exit__(self, *exc):
            return self.accordion.__exit__(*exc)

    return CheckboxAccordion


def _wire_events(gr: Any, c: dict[str, Any]) -> None:
    """Preset fills method/alpha/beta; moving those away from the preset's numbers shows `Custom`."""

    def on_preset(preset, method_label, alpha, beta):
        method_label, alpha, beta = preset_values(preset, method_label, alpha, beta)
        return gr.update(value=method_label), gr.update(value=alpha), gr.update(value=beta)

    def on_numbers(method_label, alpha, beta, preset):
        return gr.update(value=preset_for(method_label, alpha, beta, preset))

    numbers = [c["method"], c["alpha"], c["beta"]]
    try:
        c["preset"].change(fn=on_preset, inputs=[c["preset"], *numbers], outputs=numbers, show_progress=False)
        for component in numbers:
            component.change(fn=on_numbers, inputs=[*numbers, c["preset"]], outputs=[c["preset"]],
                             show_progress=False)
    except Exception as exc:  # noqa: BLE001 - headless: no Blocks context, no listeners needed
        log.debug("[VSF] UI events not wired (%s)", exc)
