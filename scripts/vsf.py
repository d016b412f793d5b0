"""Value Sign Flip: the WebUI entry point (AUTOMATIC1111 1.10, Forge, and the Forge family).

Thin by design: the UI lives in `lib_vsf/webui/ui.py`, per-generation state and every undo in
`lib_vsf/webui/runner.py`, per-host model patches in `lib_vsf/webui/hosts/`.
"""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)  # make `lib_vsf` importable when loaded from extensions/

import gradio as gr  # noqa: E402

from modules import script_callbacks, scripts  # noqa: E402

from lib_vsf.webui import runner, ui, xyz  # noqa: E402

try:
    from modules.ui_components import InputAccordion
except ImportError:  # a host without InputAccordion: an accordion with an "Enable" checkbox
    InputAccordion = ui.fallback_accordion(gr)


class ValueSignFlipScript(scripts.Script):
    """Always-visible script; its title is also the key of `alwayson_scripts` in the HTTP API."""

    sorting_priority = 15

    def title(self):
        return ui.TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        parts = ui.build(gr, InputAccordion, is_img2img)
        self.infotext_fields = parts.infotext_fields
        self.paste_field_names = []
        return parts.components

    def process(self, p, *args):
        runner.start(p, args)

    def process_before_every_sampling(self, p, *args, **kwargs):
        runner.begin_pass(p)

    def postprocess_image(self, p, pp, *args):
        runner.add_map_image(p, pp)

    def postprocess(self, p, processed, *args):
        runner.finish(p, processed)


script_callbacks.on_cfg_denoiser(runner.on_cfg_denoiser)
script_callbacks.on_before_ui(xyz.register_axes)
# With --nowebui, Forge builds every script's ui() (xyz_grid fixes its axis list there) before the
# on_before_ui callbacks run; xyz_grid.py (host scripts/) is loaded before extensions, so register now too.
xyz.register_axes()
