"""The accordion (lib_vsf/webui/ui.py) on the host double's gradio stand-in; the real gradio 3.41 and
4.40 builds are checked by tests/ui_check.py in separate environments (docs/webui.md)."""
from __future__ import annotations

import pytest

from lib_vsf.settings import PRESETS
from lib_vsf.webui import ui
from webui_host_double import host_double


UI_ORDER = ["enabled", "method", "preset", "alpha", "beta", "lambda", "start", "end", "single_pass", "show_map",
            "negative_image"]


def by_label(host, name):
    return host.components[UI_ORDER.index(name)]


def test_controls_labels_defaults_and_ids():
    with host_double() as host:
        labels = [c.label for c in host.components]
        assert labels[0] == "Value Sign Flip" and labels[-3] == "Single pass (replace CFG)"
        assert labels[-2] == "Show where the negative acts" and by_label(host, "show_map").value is False
        # optional, last (every earlier position kept), an image the script receives as a PIL RGB image
        image = by_label(host, "negative_image")
        assert labels[-1] == "Negative image (Flux Kontext, Qwen-Image-Edit)" and type(image).__name__ == "Image"
        assert image.value is None and (image.kwargs["type"], image.kwargs["image_mode"]) == ("pil", "RGB")
        assert by_label(host, "preset").kwargs["choices"] == ["Model default", *PRESETS, "Custom"]
        assert by_label(host, "preset").value == "Model default"
        assert by_label(host, "method").kwargs["choices"] == ["VSF", "NAG", "NASA"]
        assert by_label(host, "single_pass").value is True
        assert len({c.elem_id for c in host.components}) == 11
        assert all(c.elem_id.startswith("vsf_txt2img_") for c in host.components)
    with host_double(is_img2img=True) as host:
        assert all(c.elem_id.startswith("vsf_img2img_") for c in host.components)


def test_preset_fills_the_sliders_and_moving_a_slider_shows_custom():
    with host_double() as host:
        preset, alpha = by_label(host, "preset"), by_label(host, "alpha")
        preset.value = "NAG Strong"
        preset.fire()
        assert (by_label(host, "method").value, alpha.value, by_label(host, "beta").value) == ("NAG", 11.0, 0.5)
        assert preset.value == "NAG Strong"  # filling the sliders does not flip the preset to Custom
        alpha.value = 7.0
        alpha.fire()
        assert preset.value == "Custom"
        alpha.value = 11.0
        alpha.fire()
        assert preset.value == "NAG Strong"  # back on the preset's numbers


def test_headless_ui_builds_without_a_blocks_context():
    with host_double(headless=True) as host:  # --nowebui: listeners refused, components still returned
        assert len(host.components) == 11 and host.ui_defaults()[1] == "VSF"
        assert all(c.listeners == [] for c in host.components)


def test_preset_for_keeps_a_matching_name_and_reports_custom_otherwise():
    assert ui.preset_for("VSF", 3.8, 0.2, "Custom") == "VSF Strong"
    assert ui.preset_for("VSF", 3.9, 0.2, "VSF Strong") == "Custom"
    assert ui.preset_values("Custom", "NASA", 0.3, 0.0) == ("NASA", 0.3, 0.0)


def test_fallback_accordion_for_hosts_without_input_accordion():
    with host_double() as host:
        gr = host.modules["gradio"]
        with gr.Blocks():
            parts = ui.build(gr, ui.fallback_accordion(gr), is_img2img=False)
        enabled = parts.components[0]
        assert type(enabled).__name__ == "Checkbox" and enabled.value is False
        assert enabled.label == "Enable Value Sign Flip" and enabled.elem_id == "vsf_txt2img_enabled-checkbox"


def test_every_value_the_api_accepts_fits_its_slider_and_pastes_back():
    """One range everywhere: a slider's minimum/maximum is what the API accepts, so an API image's infotext
    pastes values the slider can show."""
    from lib_vsf.settings import VSFSettings, VSFSettingsError, parse_infotext
    from lib_vsf.webui.args import parse_script_args

    field = {"alpha": "alpha", "beta": "beta", "lambda": "flux_lambda"}
    with host_double() as host:
        for name in field:
            slider = by_label(host, name)
            low, high = slider.kwargs["minimum"], slider.kwargs["maximum"]
            for inside in (low, high):  # the API takes both ends of the slider ...
                assert getattr(parse_script_args([{"method": "vsf", name: inside}]).settings, field[name]) == inside
            for outside in (high + 0.01, low - 0.01):  # ... and nothing beyond either end
                with pytest.raises(VSFSettingsError, match="must be between"):
                    parse_script_args([{"method": "vsf", name: outside}])
        for name in ("start", "end"):  # the step window: fractions of the run
            assert (by_label(host, name).kwargs["minimum"], by_label(host, name).kwargs["maximum"]) == (0.0, 1.0)
        pasted = host.paste(parse_infotext(VSFSettings(alpha=by_label(host, "alpha").kwargs["maximum"],
                                                       beta=by_label(host, "beta").kwargs["maximum"],
                                                       flux_lambda=by_label(host, "lambda").kwargs["maximum"])
                                           .to_infotext_string()))
        for name in ("alpha", "beta", "lambda"):
            slider = by_label(host, name)
            assert slider.kwargs["minimum"] <= pasted[UI_ORDER.index(name)] == slider.kwargs["maximum"]
