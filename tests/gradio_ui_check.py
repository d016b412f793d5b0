"""Build the VSF accordion with a real gradio (3.41 for A1111/reForge, 4.40 for Forge/Neo) and check it.

Not collected by pytest (the CI venv has no gradio); run it in a light venv holding only gradio:

    python -m venv /tmp/g4 && /tmp/g4/bin/pip install "gradio==4.40.0" "pillow<11" "huggingface_hub<0.26" torch
    PYTHONPATH=. /tmp/g4/bin/python tests/gradio_ui_check.py

`InputAccordion` here is a tiny stand-in with the hosts' shape (a hidden checkbox whose value is the
enable flag, entered as the accordion it opens); the checks: components and order, event wiring
inside `gr.Blocks`, the preset handler's results, a headless build outside any Blocks (`--nowebui`).
Exits non-zero on the first failure.
"""
from __future__ import annotations

import sys

import gradio as gr

from lib_vsf.webui import ui
from lib_vsf.webui.args import UI_ARGS, parse_script_args


class InputAccordion:
    """Stand-in for modules.ui_components.InputAccordion: a hidden checkbox holding the enable flag,
    entered as the accordion it opens. (Not a gr.Checkbox subclass: gradio 4 writes a .pyi file next
    to the source of every component subclass; the hosts patch that out, plain gradio does not.)"""

    def __init__(self, value, label=None, elem_id=None, **kwargs):
        self.checkbox = gr.Checkbox(value=value, label=label, elem_id=elem_id, visible=False, **kwargs)
        self.value, self.label = value, label
        self.accordion = gr.Accordion(label=label, open=bool(value))

    def __enter__(self):
        self.accordion.__enter__()
        return self

    def __exit__(self, *exc):
        return self.accordion.__exit__(*exc)


def value_of(update):
    return update["value"] if isinstance(update, dict) else update.value


def check(condition, message):
    if not condition:
        print("FAIL:", message)
        sys.exit(1)
    print("ok:", message)


def main():
    print("gradio", gr.__version__)
    with gr.Blocks() as demo:
        parts = ui.build(gr, InputAccordion, is_img2img=False)
    check(len(parts.components) == len(UI_ARGS), "eleven components in UI_ARGS order")
    kinds = [type(c).__name__ for c in parts.components]
    check(kinds[1:3] == ["Dropdown", "Dropdown"] and kinds[3:8] == ["Slider"] * 5 and kinds[8:10] == ["Checkbox"] * 2
          and kinds[10] == "Image", f"component kinds {kinds}")
    image = parts.components[10]
    check(image.type == "pil" and image.image_mode == "RGB" and image.value is None, "negative image: PIL RGB, empty")
    # what gradio hands the script for an upload (its own postprocess -> preprocess round trip): a PIL image,
    # which the arguments take as the negative image
    from PIL import Image
    uploaded = image.preprocess(image.postprocess(Image.new("RGB", (8, 6), (10, 20, 30))))
    parsed = parse_script_args([True, "VSF", "VSF Quality", 3.3, 0.2, 0.0, 0.0, 1.0, True, False, uploaded])
    check(isinstance(uploaded, Image.Image) and parsed.negative_image.size == (8, 6),
          "an uploaded image parses as the negative image")
    defaults = [c.value for c in parts.components]
    args = parse_script_args(defaults)
    check(not args.enabled and args.single_pass and args.preset == "Model default", f"defaults parse: {defaults}")
    # "Show where the negative acts" is not in the infotext (the map never changes the image): no paste field
    # nor the negative image (the infotext holds its hash only): no paste field for either
    check([id(c) for c, _ in parts.infotext_fields] == [id(c) for c in parts.components[:-2]],
          "infotext_fields for every other control")
    fns = [f.fn for f in demo.fns] if isinstance(demo.fns, list) else [f.fn for f in demo.fns.values()]
    check(len(fns) == 4, f"4 listeners wired (preset + method/alpha/beta), got {len(fns)}")
    on_preset = next(fn for fn in fns if fn.__name__ == "on_preset")
    method, alpha, beta = on_preset("NAG Strong", "VSF", 3.3, 0.2)
    check((value_of(method), value_of(alpha), value_of(beta)) == ("NAG", 11.0, 0.5), "preset fills the sliders")
    on_numbers = next(fn for fn in fns if fn.__name__ == "on_numbers")
    check(value_of(on_numbers("VSF", 4.0, 0.2, "VSF Quality")) == "Custom", "moved slider shows Custom")
    config = demo.get_config_file()
    ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
    check({ui.elem_id(n, False) for n in UI_ARGS} <= ids, "elem_ids in the page config (tooltips key on them)")

    headless = ui.build(gr, InputAccordion, is_img2img=True)  # --nowebui: outside any Blocks
    check(len(headless.components) == len(UI_ARGS), "headless build returns the components")
    print("all UI checks passed on gradio", gr.__version__)


if __name__ == "__main__":
    main()
