"""The extension's glue on the host double (tests/webui_host_double.py): script registration, the API's
list and object forms, infotext round trip, XYZ axes, and every restore path of a generation."""
from __future__ import annotations

import re

import pytest

from lib_vsf.settings import VSFSettings, VSFSettingsError, parse_infotext
from lib_vsf.webui import runner
from webui_host_double import ATTENTION_MODULE, HOST_ATTENTION, DoubleModel, Img2ImgProcessing, Processing, host_double

ON = [True, "VSF", "VSF Quality", 3.3, 0.2, 0.0, 0.0, 1.0, True, False, None]


@pytest.fixture
def host():
    with host_double() as h:
        yield h


def assert_untouched(host, p):
    """Nothing of the extension is left: host attention back, p.sample unwrapped, options restored."""
    assert ATTENTION_MODULE.attention is HOST_ATTENTION
    assert "sample" not in vars(p)
    assert not hasattr(p, runner.GENERATION_ATTR)
    assert host.opts.data["skip_early_cond"] == 0.0


# -- registration ------------------------------------------------------------------------------------------

def test_script_is_always_visible_titled_value_sign_flip_with_callbacks_registered_once(host):
    assert host.script.title() == "Value Sign Flip"
    assert host.script.show(False) is host.modules["modules.scripts"].AlwaysVisible
    assert host.callbacks["cfg_denoiser"] == [runner.on_cfg_denoiser]
    assert len(host.callbacks["before_ui"]) == 1
    assert len(host.components) == 11 and host.ui_defaults()[0] is False


# -- a guided generation and its infotext ------------------------------------------------------------------

def test_enabled_generation_is_guided_and_writes_infotext(host):
    p = host.process_images(Processing(host, steps=4), ON)
    assert all(step["patched"] and step["guided"] for step in p.trace)
    assert p.extra_generation_params["VSF method"] == "vsf" and p.extra_generation_params["VSF alpha"] == "3.3"
    assert p.sd_model.encoded == [["blurry, text", "blurry, text"]]
    assert not host.hook_errors
    assert_untouched(host, p)


def test_disabled_generation_is_exactly_the_host_run(host):
    p = host.process_images(Processing(host), host.ui_defaults())
    assert p.trace and not any(step["patched"] for step in p.trace)
    assert p.extra_generation_params == {} and p.comments == {} and p.sd_model.encoded == []
    assert_untouched(host, p)


def test_infotext_pastes_back_into_the_same_ui_values(host):
    values = [True, "NAG", "NAG Strong", 11.0, 0.5, 4.0, 0.1, 0.8, False, False, None]
    p = host.process_images(Processing(host), values)
    params = parse_infotext(host.infotext(p))
    assert host.paste(params) == values
    assert VSFSettings.from_infotext(params).tau == 5.0  # NAG Strong's tau survives the round trip
    # numbers are written exactly (not to 6 significant digits), so they paste back exactly
    exact = [True, "VSF", "Custom", 1.23456789, 0.123456789, 7.77777777777, 1.0 / 3.0, 0.987654321, True, False, None]
    assert host.paste(parse_infotext(host.infotext(host.process_images(Processing(host), exact)))) == exact
    # an infotext without VSF switches the accordion off and leaves the rest alone
    assert host.paste(parse_infotext("a cat\nSteps: 4, Sampler: Euler"))[0] is False


def test_step_window_guides_only_the_steps_inside_it(host):
    p = host.process_images(Processing(host, steps=8),
                            [True, "VSF", "VSF Quality", 3.3, 0.2, 0.0, 0.25, 0.5, True, False, None])
    assert [s["step"] for s in p.trace if s["guided"]] == [2, 3]
    assert all(s["patched"] for s in p.trace)  # patched for the pass; unguided steps run the host's math


def test_hires_pass_is_covered_and_per_batch_negatives_are_used(host):
    negatives = ["red", "red", "blue hat", ""]
    p = host.process_images(Processing(host, batch_size=2, n_iter=2, enable_hr=True, negative_prompts=negatives), ON)
    assert p.sd_model.encoded == [["red", "red"], ["blue hat", ""]]  # hires reuses the batch's encoding
    assert {s["hires"] for s in p.trace if s["guided"]} == {False, True}
    assert len(p.sd_model.attached) == 4 and p.sd_model.undone == 4  # every pass undone
    assert_untouched(host, p)


def test_no_preset_gives_the_model_family_default_and_the_infotext_says_so(host, monkeypatch):
    from webui_host_double import DoubleAdapter

    ui_on = host.ui_defaults()
    ui_on[0] = True  # the accordion opened, nothing else touched: the preset dropdown shows "Model default"
    for family, (alpha, beta, flux_lambda) in {"sd3": ("3.5", "0.1", "0"), "flux": ("6", "0.2", "8")}.items():
        monkeypatch.setattr(DoubleAdapter, "family", family)
        from_ui = host.process_images(Processing(host), ui_on)
        from_api = host.process_images(Processing(host), host.api_args([{"enabled": True}]))
        for p in (from_ui, from_api):
            params = p.extra_generation_params
            assert (params["VSF alpha"], params["VSF beta"], params["VSF lambda"]) == (alpha, beta, flux_lambda)
            assert params["VSF preset"] == "Model default"
        # pasting it shows the numbers it was made with, which then give the same settings on any model
        pasted = host.paste(parse_infotext(host.infotext(from_api)))
        assert pasted[2] == "Custom" and pasted[3:6] == [float(alpha), float(beta), float(flux_lambda)]
        monkeypatch.setattr(DoubleAdapter, "family", "wan")
        again = host.process_images(Processing(host), pasted)
        assert {k: v for k, v in again.extra_generation_params.items() if k != "VSF preset"} == \
            {k: v for k, v in from_api.extra_generation_params.items() if k != "VSF preset"}


# -- the HTTP API forms ------------------------------------------------------------------------------------

def test_api_positional_list_and_object_give_the_same_generation_as_the_ui(host):
    ui = host.process_images(Processing(host), [True, "VSF", "VSF Strong", 3.8, 0.2, 0.0, 0.0, 1.0, True, False, None])
    as_list = host.process_images(Processing(host), host.api_args([True, "VSF", "VSF Strong", 3.8, 0.2]))
    as_object = host.process_images(Processing(host), host.api_args([{"enabled": True, "preset": "VSF Strong"}]))
    assert ui.extra_generation_params == as_list.extra_generation_params == as_object.extra_generation_params
    assert ui.trace == as_list.trace == as_object.trace


def test_bad_api_values_fail_the_request_clearly_and_change_nothing(host):
    p = Processing(host)
    with pytest.raises(VSFSettingsError, match="Value Sign Flip: VSF alpha must be between 0 and 20, got 500"):
        host.process_images(p, host.api_args([{"alpha": 500}]))
    assert p.trace == [] and p.extra_generation_params == {} and p.sd_model.encoded == []
    assert ATTENTION_MODULE.attention is HOST_ATTENTION
    host.run_hook("postprocess", p)  # the host's next cleanup unwraps the refusal
    assert "sample" not in vars(p) and "init" not in vars(p)


def test_refused_img2img_leaves_the_next_image_exactly_as_it_would_have_been(host):
    # img2img's init VAE-encodes the init image with the global torch RNG after the scripts' process hook;
    # a request refused only in p.sample has already moved that RNG, and the next img2img differs.
    import torch

    alone, _ = refused_img2img(host, [{"alpha": 500}], "alpha must be between", seed=1234)
    after = host.process_images(Img2ImgProcessing(host), ON).samples
    assert torch.equal(after, alone)


def refused_img2img(host, api_args, match, seed):
    """The img2img of `seed` made alone, and an img2img of the same seed refused for `api_args` (its
    error matching `match`) before the host's init ran; the caller checks the next img2img."""
    import torch

    torch.manual_seed(seed)
    alone = host.process_images(Img2ImgProcessing(host), ON).samples
    torch.manual_seed(seed)
    refused = Img2ImgProcessing(host)
    with pytest.raises(VSFSettingsError, match=match):
        host.process_images(refused, host.api_args(api_args))
    assert refused.init_latent is None and refused.extra_generation_params == {}  # the host's init never ran
    return alone, refused


# -- unsupported models and changed hosts ------------------------------------------------------------------

def test_unsupported_model_gets_one_warning_and_an_untouched_generation(host):
    p = host.process_images(Processing(host, sd_model=DoubleModel(supported=False), enable_hr=True), ON)
    assert len(p.comments) == 1 and "not supported" in next(iter(p.comments))
    assert not any(s["patched"] for s in p.trace)
    # API users see the note in the infotext (their `info` has no comments); no VSF settings are written
    assert p.extra_generation_params == {"VSF note": next(iter(p.comments))}
    assert_untouched(host, p)


def test_changed_host_function_is_refused_with_a_message_not_a_stack_trace(host, monkeypatch):
    monkeypatch.setattr(ATTENTION_MODULE, "attention", lambda x: x)
    p = Processing(host, steps=0)
    host.process_images(p, ON)
    (message,) = p.comments
    assert message.startswith("VSF is off for this image:") and "Traceback" not in message
    assert not host.hook_errors and p.sd_model.attached == []


def test_backend_note_is_shown_once_under_the_image_and_in_the_infotext(host, monkeypatch):
    from webui_host_double import DoubleAdapter
    monkeypatch.setattr(DoubleAdapter, "backend_note", lambda self: "xformers cannot carry the mask, so: SDPA")
    p = host.process_images(Processing(host, enable_hr=True), ON)
    assert list(p.comments) == ["xformers cannot carry the mask, so: SDPA"]
    assert p.extra_generation_params["VSF note"] == "xformers cannot carry the mask, so: SDPA"
    assert all(s["guided"] for s in p.trace)
    # the note survives the host's infotext quoting and pasting it back changes nothing else
    params = parse_infotext(host.infotext(p))
    assert params["VSF note"] == "xformers cannot carry the mask, so: SDPA" and host.paste(params) == ON


def test_empty_negative_gives_the_host_image_and_says_so_without_vsf_settings(host):
    plain = host.process_images(Processing(host, negative_prompt="", enable_hr=True), host.ui_defaults())
    p = host.process_images(Processing(host, negative_prompt="", enable_hr=True), ON)
    assert p.trace == plain.trace and not any(s["patched"] for s in p.trace)
    assert p.sd_model.attached == []  # no single pass forced either: the host's own CFG runs
    (note,) = p.comments
    assert "negative prompt is empty" in note and "without VSF" in note
    assert p.extra_generation_params == {"VSF note": note}
    assert host.paste(parse_infotext(host.infotext(p)))[0] is False  # pasting it gives the same plain image
    assert_untouched(host, p)


def test_notes_reach_a_console_that_shows_only_errors(host):
    # Forge Neo's logging_config.setup_logging: root at ERROR, one handler; WARNING records are dropped
    import logging

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    root, collect = logging.getLogger(), Collect()
    saved = root.level, root.handlers[:]
    root.handlers[:] = [collect]
    root.setLevel(logging.ERROR)
    try:
        host.process_images(Processing(host, sd_model=DoubleModel(supported=False)), ON)
    finally:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])
    assert any("not supported on this host" in m for m in collect.messages)


# -- every restore path -------------------------------------------------------------------------------------

def test_exception_during_sampling_restores_everything(host):
    p = Processing(host, steps=4, fail_at_step=2)
    with pytest.raises(RuntimeError, match="out of memory"):
        host.process_images(p, ON)
    assert [s["patched"] for s in p.trace] == [True, True]
    assert ATTENTION_MODULE.attention is HOST_ATTENTION and p.sd_model.undone == 1
    # postprocess never ran (as on the hosts); the next generation with the same p starts clean
    host.process_images(p := Processing(host), ON)
    assert_untouched(host, p)


def test_interrupt_or_skip_restores_everything(host):
    # Both hosts raise the same InterruptedException for interrupt and skip; the sampler returns early.
    p = host.process_images(Processing(host, steps=6, interrupt_at_step=3, enable_hr=True), ON)
    assert len([s for s in p.trace if not s["hires"]]) == 3
    assert p.sd_model.undone == len(p.sd_model.attached) == 2
    assert_untouched(host, p)


def test_a1111_single_pass_option_is_restored_on_every_path():
    from types import SimpleNamespace

    import torch

    from lib_vsf.state import GuidanceRun, NegativeText
    from lib_vsf.webui.hosts.a1111_sd3 import A1111SD3Adapter
    from lib_vsf.webui.hosts.base import SamplingContext

    with host_double() as host:
        host.opts.data["skip_early_cond"] = 0.25
        p = SimpleNamespace(extra_generation_params={"Sampler": "Euler"})
        calls = []
        host_apply_model = lambda x, t, cond: calls.append(cond["crossattn"].shape) or x  # noqa: E731
        sd_model = SimpleNamespace(apply_model=host_apply_model)
        ctx = SamplingContext(GuidanceRun(VSFSettings()), NegativeText.from_sequences([torch.ones(3, 4)]), True)
        A1111SD3Adapter(sd_model).attach(p, ctx)
        assert host.opts.data["skip_early_cond"] == 1.0
        sd_model.apply_model("x", "t", {"crossattn": torch.zeros(1, 5, 4), "vector": torch.zeros(1, 2)})
        assert calls == [torch.Size([1, 8, 4])]  # negative appended to the conditional row
        p.extra_generation_params["Skip Early CFG"] = 1.0  # what A1111's denoiser writes when skipping
        for undo in reversed(ctx.undo):
            undo()
        assert host.opts.data["skip_early_cond"] == 0.25
        assert p.extra_generation_params == {"Sampler": "Euler"}
        assert sd_model.apply_model is host_apply_model


def test_a1111_single_pass_leaves_no_skip_early_cfg_in_the_infotext(host):
    # A1111's CFG denoiser writes "Skip Early CFG" into p.extra_generation_params on every model call while
    # the option is set; the infotext write replaces that dict during the pass. Pasting such an infotext
    # would turn CFG off for later images, so nothing VSF set for the run may be left in it.
    p = host.process_images(Processing(host, sd_model=DoubleModel(a1111_single_pass=True)), ON)
    assert p.trace and all(s["guided"] for s in p.trace)
    assert "Skip Early CFG" not in p.extra_generation_params and p.extra_generation_params["VSF method"] == "vsf"
    assert host.opts.data["skip_early_cond"] == 0.0
    # the user's own option: written by the host as before when VSF is off ...
    host.opts.data["skip_early_cond"] = 0.5
    plain = host.process_images(Processing(host, sd_model=DoubleModel(a1111_single_pass=True)), host.ui_defaults())
    assert plain.extra_generation_params == {"Skip Early CFG": 0.5}
    # ... and with VSF on (which skips every uncond pass itself) neither 1.0 nor the user's value is recorded
    guided = host.process_images(Processing(host, sd_model=DoubleModel(a1111_single_pass=True)), ON)
    assert "Skip Early CFG" not in guided.extra_generation_params and host.opts.data["skip_early_cond"] == 0.5


# -- XYZ -----------------------------------------------------------------------------------------------------

def test_xyz_axes_are_registered_once(host):
    for callback in host.callbacks["before_ui"] * 2:
        callback()
    labels = [o.label for o in host.xyz.axis_options]
    expected = ["[VSF] Method", "[VSF] Preset", "[VSF] Alpha", "[VSF] Beta", "[VSF] Lambda", "[VSF] Start", "[VSF] End"]
    assert [label for label in labels if label.startswith("[VSF]")] == expected
    assert "Off" in next(o for o in host.xyz.axis_options if o.label == "[VSF] Method").choices()


def test_every_xyz_cell_uses_its_own_value(host):
    host.callbacks["before_ui"][0]()
    base = Processing(host)
    cells = [host.xyz_cell(base, **{"[VSF] Alpha": a, "[VSF] Preset": "VSF Strong"}) for a in (1.0, 2.5)]
    off = host.xyz_cell(base, **{"[VSF] Method": "Off"})
    results = [host.process_images(c, host.ui_defaults()) for c in cells]  # accordion closed: the axis enables VSF
    assert [r.extra_generation_params["VSF alpha"] for r in results] == ["1", "2.5"]
    assert not hasattr(base, "vsf_xyz")  # cells never share or mutate the base's overrides
    assert host.process_images(off, ON).extra_generation_params == {}


def test_xyz_preset_axis_offers_the_model_default(host):
    host.callbacks["before_ui"][0]()
    ui_window = [True, "VSF", "VSF Strong", 3.8, 0.2, 0.0, 0.25, 0.75, True, False, None]
    cells = host.run_xyz(Processing(host), [("[VSF] Preset", ["Model default", "VSF Quality"])], ui_window)
    params = [c.extra_generation_params for c in cells]
    assert [(q["VSF preset"], q["VSF alpha"], q["VSF beta"], q["VSF start"]) for q in params] == \
        [("Model default", "3.5", "0.1", "0.25"), ("VSF Quality", "3.3", "0.2", "0.25")]  # the double is "sd3"


def test_xyz_confirm_rejects_bad_values_before_the_grid_runs(host):
    host.callbacks["before_ui"][0]()
    with pytest.raises(VSFSettingsError) as error:
        host.run_xyz(Processing(host), [("[VSF] Beta", [0.1, -5.0])], ON)
    # the range error's own message (not "is not a number"), naming the cell; no cell ran
    assert str(error.value) == ("Value Sign Flip, X/Y/Z cell [VSF] Beta: -5.0: "
                                "VSF beta must be between 0 and 10, got -5")
    cells = host.run_xyz(Processing(host), [("[VSF] Beta", [0.0, 0.5])], ON)
    assert [c.extra_generation_params["VSF beta"] for c in cells] == ["0", "0.5"] and not host.hook_errors


@pytest.mark.parametrize("script_args, axes, message", [
    # NAG's blend is capped at 1: fine for VSF Quality alone, wrong in the NAG column of this grid
    (ON, [("[VSF] Method", ["VSF", "NAG"]), ("[VSF] Beta", [0.2, 2.0])],
     "cell [VSF] Method: NAG, [VSF] Beta: 2.0: NAG blend (beta) must be between 0 and 1, got 2"),
    # the UI's end 0.5 with a start axis reaching past it
    ([True, "VSF", "VSF Quality", 3.3, 0.2, 0.0, 0.0, 0.5, True, False, None], [("[VSF] Start", [0.0, 0.6])],
     "cell [VSF] Start: 0.6: VSF start (0.6) must be smaller than end (0.5)"),
    # the API object's end, with the accordion's arguments given as one dict
    ([{"end": 0.4}], [("[VSF] Alpha", [1.0]), ("[VSF] Start", [0.2, 0.4])],
     "cell [VSF] Alpha: 1.0, [VSF] Start: 0.4: VSF start (0.4) must be smaller than end (0.4)"),
])
def test_xyz_confirm_checks_each_cell_against_its_real_settings(host, script_args, axes, message):
    # Checked against VSF Quality alone, these passed confirm and then failed inside their cells, which the
    # X/Y/Z script only reports to the console (the cell stays empty).
    host.callbacks["before_ui"][0]()
    p = Processing(host)
    with pytest.raises(VSFSettingsError, match=re.escape(message)):
        host.run_xyz(p, axes, script_args)
    assert p.trace == [] and not host.hook_errors


def test_xyz_confirm_refuses_bad_script_arguments_before_the_grid(host):
    host.callbacks["before_ui"][0]()
    with pytest.raises(VSFSettingsError, match="Value Sign Flip: VSF alpha must be between 0 and 20, got 50"):
        host.run_xyz(Processing(host), [("[VSF] Beta", [0.1])], [{"alpha": 50}])


def test_a_new_generation_never_starts_on_top_of_live_patches(host):
    # A host path that bypasses both the p.sample wrapper and postprocess (never seen; belt and braces).
    stray = Processing(host)
    stray.script_args, stray.negative_prompts = ON, stray.all_negative_prompts
    host.run_hook("process", stray)
    host.run_hook("process_before_every_sampling", stray)
    assert ATTENTION_MODULE.attention is not HOST_ATTENTION
    p = host.process_images(Processing(host), host.ui_defaults())  # VSF off for the next generation
    assert ATTENTION_MODULE.attention is HOST_ATTENTION and not any(s["patched"] for s in p.trace)
    assert stray.sd_model.undone == 1


def test_bad_request_error_is_an_http_422_where_fastapi_exists(monkeypatch):
    import sys
    import types

    class HTTPException(Exception):  # fastapi.HTTPException's shape (status_code, detail)
        def __init__(self, status_code, detail=None, headers=None):
            super().__init__(status_code, detail)
            self.status_code, self.detail = status_code, detail

    monkeypatch.setitem(sys.modules, "fastapi", types.SimpleNamespace(HTTPException=HTTPException))
    error = runner.argument_error("Value Sign Flip: VSF alpha must be a number, got 'banana'")
    assert isinstance(error, VSFSettingsError) and isinstance(error, HTTPException)
    assert error.status_code == 422 and str(error) == error.detail == "Value Sign Flip: VSF alpha must be a number, got 'banana'"


def test_forge_wrapper_runs_a_call_plain_when_rows_do_not_map_onto_images():
    from types import SimpleNamespace

    import torch

    from lib_vsf.state import GuidanceRun, NegativeText
    from lib_vsf.webui.hosts._forge_sampling import attach_forge
    from lib_vsf.webui.hosts.base import SamplingContext

    class Patcher:  # Forge's UnetPatcher, as far as attach_forge uses it
        def __init__(self):
            self.model_options = {}

        def clone(self):
            return Patcher()

        def set_model_unet_function_wrapper(self, fn):
            self.model_options["model_function_wrapper"] = fn

        def add_conditioning_modifier(self, fn):
            self.model_options.setdefault("conditioning_modifiers", []).append(fn)

    p = SimpleNamespace(sd_model=SimpleNamespace(forge_objects=SimpleNamespace(unet=Patcher())))
    negative = NegativeText.from_sequences([torch.ones(2, 4), torch.ones(3, 4)])  # two images
    run = GuidanceRun(VSFSettings())
    attach_forge(p, SamplingContext(run, negative, single_pass=True))
    wrapper = p.sd_model.forge_objects.unet.model_options["model_function_wrapper"]
    seen = []
    apply_model = lambda x, t, **c: seen.append(c["c_crossattn"].shape) or x  # noqa: E731
    wrapper(apply_model, {"input": "x", "timestep": "t", "c": {"c_crossattn": torch.zeros(3, 5, 4)}, "cond_or_uncond": [0]})
    wrapper(apply_model, {"input": "x", "timestep": "t", "c": {"c_crossattn": torch.zeros(2, 5, 4)}, "cond_or_uncond": [0]})
    assert seen == [torch.Size([3, 5, 4]), torch.Size([2, 8, 4])]  # 3 rows for 2 images: plain; 2 rows: guided
    modifier = p.sd_model.forge_objects.unet.model_options["conditioning_modifiers"][0]
    assert modifier("m", "x", "t", "uncond", "cond", 7.0, {}, 0) == ("m", "x", "t", None, "cond", 1.0, {}, 0)


# -- a family adapter's settings through the shared runner -------------------------------------------------

def test_neo_qwen_image_family_gets_its_default_through_ui_api_infotext_xyz_and_window(host, monkeypatch):
    """The Qwen-Image adapter's family (`NeoQwenImageAdapter.family`) on the double: `Model default` resolves
    to that family's entry of `FAMILY_DEFAULTS` from the UI, the API list and the API object alike; the
    infotext pastes back to the same generation; XYZ cells and the step window act on it."""
    from lib_vsf.settings import FAMILY_DEFAULTS, PAPER_TUNED_FAMILIES
    from lib_vsf.webui.hosts.neo_qwen import NeoQwenImageAdapter
    from webui_host_double import DoubleAdapter

    family = NeoQwenImageAdapter.family
    assert family in FAMILY_DEFAULTS and family not in PAPER_TUNED_FAMILIES  # listed, and marked untuned
    monkeypatch.setattr(DoubleAdapter, "family", family)
    default = FAMILY_DEFAULTS[family]
    ui_on = host.ui_defaults()
    ui_on[0] = True
    from_ui = host.process_images(Processing(host), ui_on)
    as_list = host.process_images(Processing(host), host.api_args([True, "VSF", "Model default"]))
    as_object = host.process_images(Processing(host), host.api_args([{"enabled": True}]))
    for p in (from_ui, as_list, as_object):
        params = p.extra_generation_params
        assert (float(params["VSF alpha"]), float(params["VSF beta"])) == (default.alpha, default.beta)
        assert params["VSF preset"] == "Model default" and p.trace == from_ui.trace
    pasted = host.paste(parse_infotext(host.infotext(as_object)))
    assert host.process_images(Processing(host), pasted).trace == as_object.trace
    host.callbacks["before_ui"][0]()
    cells = host.run_xyz(Processing(host), [("[VSF] Alpha", [1.5, 4.0])], ui_on)
    assert [c.extra_generation_params["VSF alpha"] for c in cells] == ["1.5", "4"]
    window = host.process_images(Processing(host, steps=8), host.api_args([{"enabled": True, "start": 0.5, "end": 0.75}]))
    assert [s["step"] for s in window.trace if s["guided"]] == [4, 5]


# -- a negative image (edit models; docs/negative-images.md) -------------------------------------------------

def negative_picture(seed=3):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8))


def as_base64(image):
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def with_image(values, image):
    return [*values[:10], image]


def test_negative_image_guides_an_edit_model_and_the_infotext_records_its_hash_only(host):
    import hashlib
    import io

    image = negative_picture()
    edit = DoubleModel(takes_images=True)
    from_ui = host.process_images(Processing(host, sd_model=edit, enable_hr=True), with_image(ON, image))
    assert all(s["guided"] for s in from_ui.trace) and not host.hook_errors
    assert len(edit.encoded_images) == 1  # encoded once per generation (the hires pass reuses it)
    png = io.BytesIO()
    image.save(png, format="PNG")
    params = from_ui.extra_generation_params
    assert params["VSF negative image"] == hashlib.sha256(png.getvalue()).hexdigest()[:10]
    assert "base64" not in host.infotext(from_ui) and len(host.infotext(from_ui)) < 400  # never the image
    # the API's list and object forms (base64, as the host's own image arguments) give the same generation
    as_list = host.process_images(Processing(host, sd_model=DoubleModel(takes_images=True), enable_hr=True),
                                  host.api_args(with_image(ON, as_base64(image))))
    as_object = host.process_images(Processing(host, sd_model=DoubleModel(takes_images=True), enable_hr=True),
                                    host.api_args([{"enabled": True, "preset": "VSF Quality",
                                                    "negative_image": as_base64(image)[22:]}]))
    assert as_list.extra_generation_params == as_object.extra_generation_params == params
    assert as_list.trace == as_object.trace == from_ui.trace
    # pasting the infotext restores every other control and leaves the image input as it is (a hash
    # cannot be pasted back); without a negative image the key is absent
    pasted = host.paste(parse_infotext(host.infotext(from_ui)))
    assert pasted == ON
    assert "VSF negative image" not in host.process_images(Processing(host, sd_model=edit), ON).extra_generation_params
    assert_untouched(host, from_ui)


def test_negative_image_alone_guides_without_a_negative_prompt(host):
    edit = DoubleModel(takes_images=True)
    p = host.process_images(Processing(host, sd_model=edit, negative_prompt=""), with_image(ON, negative_picture()))
    assert p.trace and all(s["guided"] for s in p.trace) and p.comments == {}
    assert "VSF negative image" in p.extra_generation_params
    assert_untouched(host, p)


def test_negative_image_on_a_model_without_reference_images_is_refused_and_the_next_image_is_untouched(host):
    import torch

    alone, refused = refused_img2img(host, with_image(ON, as_base64(negative_picture())),
                                     "a negative image needs a model that takes reference images", seed=99)
    assert refused.trace == []
    assert refused.sd_model.encoded == [] and refused.sd_model.encoded_images == []
    host.run_hook("postprocess", refused)
    assert "sample" not in vars(refused) and "init" not in vars(refused)
    assert torch.equal(host.process_images(Img2ImgProcessing(host), ON).samples, alone)
    # an unreadable image is refused the same way, on any model; with VSF off the slot is not looked at
    with pytest.raises(VSFSettingsError, match="Value Sign Flip: VSF negative image is not valid base64"):
        host.process_images(Processing(host, sd_model=DoubleModel(takes_images=True)),
                            host.api_args([{"negative_image": "%%%"}]))
    off = host.process_images(Processing(host), with_image(host.ui_defaults(), negative_picture()))
    assert not any(s["patched"] for s in off.trace) and off.extra_generation_params == {}


def test_xyz_over_alpha_keeps_the_negative_image(host):
    host.callbacks["before_ui"][0]()
    image = negative_picture(seed=5)
    edit = DoubleModel(takes_images=True)
    cells = host.run_xyz(Processing(host, sd_model=edit), [("[VSF] Alpha", [1.0, 4.0])], with_image(ON, image))
    assert not host.hook_errors
    assert [c.extra_generation_params["VSF alpha"] for c in cells] == ["1", "4"]
    assert len({c.extra_generation_params["VSF negative image"] for c in cells}) == 1
    assert [{s["alpha"] for s in c.trace} for c in cells] == [{1.0}, {4.0}] and all(s["guided"] for c in cells for s in c.trace)
    assert edit.encoded_images == [image, image]  # each cell encodes the image it was given
    # the grid over a model without reference images is refused in each cell, not silently run without it
    plain_cells = host.run_xyz(Processing(host), [("[VSF] Alpha", [1.0])], with_image(ON, image))
    assert plain_cells == [None] and "negative image needs a model" in host.hook_errors[-1]


def test_forge_wrapper_gives_the_negative_image_to_cond_rows_only():
    """CFG kept: the model call's uncond rows see neither the negative text nor the negative image."""
    from types import SimpleNamespace

    import torch

    from lib_vsf.state import GuidanceRun, NegativeText
    from lib_vsf.webui.hosts._forge_sampling import attach_forge
    from lib_vsf.webui.hosts._reference_tokens import ReferenceLatent
    from lib_vsf.webui.hosts.base import SamplingContext

    class Patcher:
        def __init__(self):
            self.model_options = {}

        def clone(self):
            return Patcher()

        def set_model_unet_function_wrapper(self, fn):
            self.model_options["model_function_wrapper"] = fn

    p = SimpleNamespace(sd_model=SimpleNamespace(forge_objects=SimpleNamespace(unet=Patcher())))
    run = GuidanceRun(VSFSettings())
    run.negative_image = ReferenceLatent(torch.zeros(1, 16, 4, 4), 4)
    seen = []

    def apply_model(x, t, **c):
        seen.append((c["c_crossattn"].shape[1], run.text_len, run.negative_len, run.negative_image_len,
                     None if run.negative_mask is None else run.negative_mask.tolist()))
        return x

    for texts in ([torch.ones(2, 4)], [torch.ones(0, 4)]):  # a negative prompt, then an empty one
        attach_forge(p, SamplingContext(run, NegativeText.from_sequences(texts), single_pass=False))
        wrapper = p.sd_model.forge_objects.unet.model_options["model_function_wrapper"]
        wrapper(apply_model, {"input": "x", "timestep": "t", "c": {"c_crossattn": torch.zeros(2, 5, 4)},
                              "cond_or_uncond": [0, 1]})
    assert seen[0] == (7, 7, 6, 4, [[True] * 6, [False] * 6])  # [P, N_txt] text; image tokens for the cond row
    assert seen[1] == (5, 5, 4, 4, [[True] * 4, [False] * 4])  # nothing appended to the text
    assert run.negative_len == 0  # the call's text stream is cleared after it
