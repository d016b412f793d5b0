"""Opt-in end-to-end test: the extension inside a real Forge API server on CPU, tiny SD3 checkpoint.

Skipped unless both are set:

    VSF_FORGE_DIR=<Forge checkout>        (lllyasviel/stable-diffusion-webui-forge, dfdcbab6 seen working)
    VSF_FORGE_PYTHON=<its venv's python>  (tests/e2e/setup_forge_env.sh builds both)

Optional: VSF_FORGE_CKPT (tiny checkpoint; default <forge>/models/Stable-diffusion/vsf-tiny-sd3.safetensors,
built with tests/e2e/make_tiny_sd3_checkpoint.py when missing), VSF_FORGE_STARTUP_TIMEOUT (s, default 300),
VSF_FORGE_REQUEST_TIMEOUT (s, default 300), VSF_FORGE_KEEP_LOG=1 (print the server log at the end).

The module starts `launch.py --nowebui --api --always-cpu ...` itself on 127.0.0.1 through the shared
harness `webui_server.py` (free port unless VSF_E2E_PORT is set; server log in
<temp>/vsf-e2e/forge-server.log unless VSF_E2E_LOG_DIR is set), with this repository symlinked as
<forge>/extensions/sd-webui-vsf (removed afterwards) and its own settings file (live previews off, T5 off),
waits for it with a bounded timeout and stops it in a `finally`. About a dozen
64x64, 3-step requests in all; nothing leaves the loopback interface.

Checks (the issue's a-d):
  a. `alwayson_scripts["Value Sign Flip"]` as a positional list and as one dict runs VSF: the infotext
     carries the VSF keys, the image differs from the unguided one, and both forms give the same image;
     with hires fix on, the second pass runs guided too (image differs from unguided hires).
  b. X/Y/Z plot over `[VSF] Alpha` gives one image per value, each with its alpha in the infotext;
     over `[VSF] Method` with an `Off` cell, that cell is the unguided image with no VSF infotext.
  c. after VSF calls, a call without the extension (and one with it disabled) reproduces, bit for bit,
     the unguided image made before any VSF call.
  d. bad API values give an HTTP error whose message names the problem; the next calls are unaffected.
  e. VSF-SPEC invariants through the server: empty negative prompt or a step window that no step falls
     in give exactly the unguided image; a batch of 2 equals each seed alone (within 2/255).
  h. "Show where the negative acts": a map image per output after the outputs in `images` only when
     asked (dict `show_map`, positional checkbox), each output's `VSF note` with its share, the outputs
     bit for bit those made without the map.
  z. the server log holds no error report or traceback that involves the extension.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from webui_server import (  # noqa: E402  (the shared live-server harness, next to this file)
    SCRIPT_TITLE, WebUIServer, decode_image as _decode, env_float, extension_errors, extra_images,
    infotext_value, infotexts, params_line, running, vsf_keys,
)

FORGE_DIR = os.environ.get("VSF_FORGE_DIR", "")
FORGE_PYTHON = os.environ.get("VSF_FORGE_PYTHON", "")
STARTUP_TIMEOUT = env_float("VSF_FORGE_STARTUP_TIMEOUT", env_float("VSF_E2E_STARTUP_TIMEOUT", 300))
REQUEST_TIMEOUT = env_float("VSF_FORGE_REQUEST_TIMEOUT", env_float("VSF_E2E_REQUEST_TIMEOUT", 300))
CKPT_NAME = "vsf-tiny-sd3.safetensors"

pytestmark = pytest.mark.skipif(
    not (FORGE_DIR and FORGE_PYTHON),
    reason="opt-in: set VSF_FORGE_DIR and VSF_FORGE_PYTHON (see tests/e2e/setup_forge_env.sh)",
)

# Every request shares these: tiny, deterministic, CFG 1 (Forge's own path ignores the negative prompt).
# "Simple" schedule: Forge's "Automatic" schedule for SD3 at 3 steps calls the model at sigma 0 and
# Euler then divides by zero (black NaN image), unrelated to the extension.
BASE_REQUEST = {
    "prompt": "a photo of a cat",
    "negative_prompt": "dog, blurry",
    "width": 64,
    "height": 64,
    "steps": 3,
    "cfg_scale": 1.0,
    "seed": 42,
    "sampler_name": "Euler",
    "scheduler": "Simple",
    "batch_size": 1,
    "n_iter": 1,
}
LAUNCH_FLAGS = [
    "--nowebui", "--api", "--always-cpu", "--skip-torch-cuda-test", "--skip-prepare-environment",
    "--skip-python-version-check", "--skip-version-check", "--no-download-sd-model",
]


class Forge(WebUIServer):
    """The running server, plus the baseline made before any VSF call and results shared between checks."""

    baseline: dict | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.results: dict[str, dict] = {}


def script_info(forge: Forge, name: str) -> dict:
    return forge.script_info(name)


# --------------------------------------------------------------------------------------------------
# the server

def _ensure_checkpoint(forge_dir: str) -> str:
    ckpt = os.environ.get("VSF_FORGE_CKPT") or os.path.join(forge_dir, "models", "Stable-diffusion", CKPT_NAME)
    if not os.path.isfile(ckpt):
        subprocess.run([FORGE_PYTHON, os.path.join(HERE, "make_tiny_sd3_checkpoint.py"),
                        "--forge-dir", forge_dir, "--out", ckpt], check=True, timeout=900)
    return ckpt


@pytest.fixture(scope="module")
def forge():
    forge_dir = os.path.abspath(FORGE_DIR)
    for must in ("launch.py", os.path.join("repositories", "huggingface_guess", "huggingface_guess")):
        if not os.path.exists(os.path.join(forge_dir, must)):
            pytest.fail(f"{forge_dir} lacks {must}: run tests/e2e/setup_forge_env.sh first")
    ckpt = _ensure_checkpoint(forge_dir)

    workdir = tempfile.mkdtemp(prefix="vsf-forge-e2e-")
    settings_file = os.path.join(workdir, "config.json")
    with open(settings_file, "w") as f:
        # live previews would try to download a preview decoder; T5 is not in the tiny checkpoint
        json.dump({"live_previews_enable": False, "sd3_enable_t5": False,
                   "sd_model_checkpoint": os.path.basename(ckpt)}, f)
    server = Forge("forge", forge_dir, FORGE_PYTHON,
                   [*LAUNCH_FLAGS, "--ui-settings-file", settings_file, "--ckpt", ckpt],
                   base_request=BASE_REQUEST, startup_timeout=STARTUP_TIMEOUT, request_timeout=REQUEST_TIMEOUT)
    try:
        with running(server, fail=pytest.fail):
            # The unguided reference, before any VSF call (check c compares against it).
            server.baseline = server.txt2img_ok("baseline (unguided, before any VSF call)")
            yield server
    finally:
        if os.environ.get("VSF_FORGE_KEEP_LOG") and not os.environ.get("VSF_E2E_KEEP_LOG"):
            with open(server.log_path, "r", errors="replace") as f:
                print("".join(f.readlines()[-400:]))


# --------------------------------------------------------------------------------------------------
# checks

def custom_vsf_values(alpha, beta) -> dict:
    # "Custom": the default preset, Model default, would take the model's numbers instead of these
    return {"method": "VSF", "preset": "Custom", "alpha": alpha, "beta": beta}


def _assert_vsf_infotext(text: str, alpha: float, beta: float):
    keys = vsf_keys()
    method = infotext_value(text, keys["method"])
    assert method is not None and method.lower() == "vsf", f"no '{keys['method']}: vsf' in infotext: {text!r}"
    got_alpha = infotext_value(text, keys["alpha"])
    assert got_alpha is not None and float(got_alpha) == pytest.approx(alpha), f"alpha: {text!r}"
    got_beta = infotext_value(text, keys["beta"])
    assert got_beta is not None and float(got_beta) == pytest.approx(beta), f"beta: {text!r}"


def test_baseline_is_plain(forge):
    text = infotexts(forge.baseline)[0]
    assert "VSF" not in text, text
    assert "Model: vsf-tiny-sd3" in text, text
    img = _decode(forge.baseline["images"][0])
    assert img.shape == (64, 64, 3)
    assert img.std() > 1.0, "baseline image is flat (NaN latents decode to black)"


@pytest.mark.parametrize("form", ["positional", "dict"])
def test_a_vsf_runs_from_api(forge, form):
    alpha, beta = 3.3, 0.2
    if form == "positional":
        args = forge.vsf_positional(custom_vsf_values(alpha, beta))
    else:
        args = [{"enabled": True, "method": "vsf", "alpha": alpha, "beta": beta}]
    data = forge.txt2img_ok(f"(a) VSF {form} args", alwayson_scripts={SCRIPT_TITLE: {"args": args}})
    text = infotexts(data)[0]
    _assert_vsf_infotext(text, alpha, beta)
    img, base = _decode(data["images"][0]), _decode(forge.baseline["images"][0])
    diff = abs(img.astype(int) - base.astype(int))
    assert diff.max() > 0, "VSF image equals the unguided one"
    forge.results[form] = data
    other = forge.results.get("dict" if form == "positional" else "positional")
    if other is not None:
        assert (_decode(other["images"][0]) == img).all(), "positional and dict forms gave different images"


# Forge's API leaves hr_additional_modules None unless sent, and its sample() then fails with
# "argument of type 'NoneType' is not iterable" (host bug, with or without the extension).
HIRES = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "hr_second_pass_steps": 2,
         "denoising_strength": 0.5, "hr_additional_modules": ["Use same choices"]}


def test_a_hires_fix_pass_is_guided_too(forge):
    """Forge calls process_before_every_sampling again for the hires pass (96x96 here)."""
    plain = forge.txt2img_ok("(a) hires fix, unguided", **HIRES)
    guided = forge.txt2img_ok("(a) hires fix, VSF dict", **HIRES, alwayson_scripts={
        SCRIPT_TITLE: {"args": [{"enabled": True, "method": "vsf", "alpha": 3.3, "beta": 0.2}]}})
    _assert_vsf_infotext(infotexts(guided)[0], 3.3, 0.2)
    a, b = _decode(plain["images"][0]), _decode(guided["images"][0])
    assert a.shape == b.shape == (96, 96, 3), (a.shape, b.shape)
    assert (a != b).any(), "VSF hires image equals the unguided hires image"


def test_b_xyz_over_alpha(forge):
    values = [1.5, 3.3, 6.0]
    entry = script_info(forge, "x/y/z plot")
    choices = entry["args"][0]["choices"] or []
    assert "[VSF] Alpha" in choices, (
        "'[VSF] Alpha' is not among the X/Y/Z plot axes the API offers (X type choices: "
        f"{len(choices)}, none VSF: {[c for c in choices if 'VSF' in c]}). With --nowebui, Forge runs every "
        "script's ui() (which fixes xyz_grid's current_axis_options) before the on_before_ui callbacks.")
    x_type = choices.index("[VSF] Alpha")
    nothing = choices.index("Nothing")
    # run(p, x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown, z_type, z_values,
    #     z_values_dropdown, draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds,
    #     vary_seeds_x, vary_seeds_y, vary_seeds_z, margin_size, csv_mode)
    script_args = [x_type, ", ".join(f"{v:g}" for v in values), [], nothing, "", [], nothing, "", [],
                   True, True, False, False, False, False, False, 0, False]
    data = forge.txt2img_ok("(b) XYZ over [VSF] Alpha", script_name="x/y/z plot", script_args=script_args)
    texts = infotexts(data)
    images = data["images"]
    # grid first, then one image per value (include_lone_images)
    assert len(images) == 1 + len(values), f"{len(images)} images for {len(values)} values"
    cells = texts[1:1 + len(values)]
    assert len(cells) == len(values), texts
    keys = vsf_keys()
    got = [infotext_value(t, keys["alpha"]) for t in cells]
    assert [float(g) if g is not None else None for g in got] == pytest.approx(values), got
    pixels = [_decode(b).astype(int) for b in images[1:]]
    for i in range(len(values)):
        for j in range(i + 1, len(values)):
            assert (pixels[i] != pixels[j]).any(), f"alpha {values[i]} and {values[j]} gave the same image"


def test_b_xyz_method_axis_off_cell_is_plain(forge):
    """`[VSF] Method` with an `Off` cell after guided cells: XYZ cells are shallow copies of one `p`, so
    the Off cell must neither be guided nor inherit the VSF infotext of the cells before it."""
    entry = script_info(forge, "x/y/z plot")
    choices = entry["args"][0]["choices"] or []
    assert "[VSF] Method" in choices, [c for c in choices if "VSF" in c]
    nothing = choices.index("Nothing")
    methods = ["VSF", "NASA", "Off"]
    script_args = [choices.index("[VSF] Method"), "", methods, nothing, "", [], nothing, "", [],
                   True, True, False, False, False, False, False, 0, False]
    data = forge.txt2img_ok("(b) XYZ over [VSF] Method incl. Off", script_name="x/y/z plot", script_args=script_args)
    assert len(data["images"]) == 1 + len(methods)
    cells = infotexts(data)[1:]
    key = vsf_keys()["method"]
    assert [infotext_value(t, key) for t in cells] == ["vsf", "nasa", None], [params_line(t) for t in cells]
    off = _decode(data["images"][-1])
    assert (off == _decode(forge.baseline["images"][0])).all(), "Off cell is not the unguided image"


@pytest.mark.parametrize("bad", [
    {"enabled": True, "method": "vsf", "alpha": "banana"},
    {"enabled": True, "method": "vsf", "alpha": -1},
    {"enabled": True, "method": "not-a-method"},
], ids=["alpha-not-number", "alpha-negative", "unknown-method"])
def test_d_bad_value_is_a_clear_error(forge, bad):
    status, data = forge.txt2img(f"(d) bad value {bad}", alwayson_scripts={SCRIPT_TITLE: {"args": [bad]}})
    assert status >= 400, f"bad value accepted: HTTP {status}"
    message = json.dumps(data) if not isinstance(data, str) else data
    assert "VSF" in message or "Value Sign Flip" in message, message
    field = "method" if "method" in bad and bad["method"] != "vsf" else "alpha"
    assert field in message.lower(), f"error does not name {field!r}: {message}"


def test_d_next_call_after_errors_is_unaffected(forge):
    # a bad positional list too, then a good VSF call must equal (a) and an unguided call the baseline
    bad = forge.vsf_positional(custom_vsf_values("x", 0.2))
    status, data = forge.txt2img("(d) bad positional alpha", alwayson_scripts={SCRIPT_TITLE: {"args": bad}})
    assert status >= 400 and "alpha" in json.dumps(data).lower(), (status, data)
    good = forge.txt2img_ok("(d) VSF dict after errors", alwayson_scripts={
        SCRIPT_TITLE: {"args": [{"enabled": True, "method": "vsf", "alpha": 3.3, "beta": 0.2}]}})
    _assert_vsf_infotext(infotexts(good)[0], 3.3, 0.2)
    earlier = forge.results.get("dict")
    if earlier is not None:
        assert (_decode(good["images"][0]) == _decode(earlier["images"][0])).all(), \
            "VSF after a failed request differs from the same VSF request before it"


def _vsf_args(**settings) -> dict:
    return {SCRIPT_TITLE: {"args": [dict({"enabled": True, "method": "vsf", "alpha": 3.3, "beta": 0.2}, **settings)]}}


@pytest.mark.parametrize("case", ["empty-negative", "window-after-last-step"])
def test_e_no_negative_influence_is_exactly_unguided(forge, case):
    """VSF-SPEC invariants: an empty negative prompt, or a step window no step falls in (3 steps:
    fractions 0, 1/3, 2/3 < 0.9), give exactly the unguided pass."""
    if case == "empty-negative":
        data = forge.txt2img_ok(f"(e) VSF on, {case}", negative_prompt="", alwayson_scripts=_vsf_args())
    else:
        data = forge.txt2img_ok(f"(e) VSF on, {case}", alwayson_scripts=_vsf_args(start=0.9, end=1.0))
    assert (_decode(data["images"][0]) == _decode(forge.baseline["images"][0])).all()


def test_e_batch_equals_each_image_alone(forge):
    """A batch of 2 guided images equals each seed guided alone, up to the host's own batch-vs-single
    float noise (1/255 seen on CPU, unguided too)."""
    batch = forge.txt2img_ok("(e) VSF batch of 2", batch_size=2, alwayson_scripts=_vsf_args())
    assert len(batch["images"]) == 2
    alone = [forge.results.get("dict") or forge.txt2img_ok("(e) VSF seed 42 alone", alwayson_scripts=_vsf_args()),
             forge.txt2img_ok("(e) VSF seed 43 alone", seed=43, alwayson_scripts=_vsf_args())]
    for k in range(2):
        _assert_vsf_infotext(infotexts(batch)[k], 3.3, 0.2)
        diff = abs(_decode(batch["images"][k]).astype(int) - _decode(alone[k]["images"][0]).astype(int)).max()
        assert diff <= 2, f"batch image {k} differs from the same seed alone by {diff}/255"


def test_h_negative_map_only_when_asked(forge):
    plain = forge.results.get("dict") or forge.txt2img_ok("(h) VSF dict, no map", alwayson_scripts=_vsf_args())
    assert extra_images(plain) == [] and "Negative share" not in infotexts(plain)[0]
    asked = forge.txt2img_ok("(h) VSF dict, show_map, batch of 2", batch_size=2,
                             alwayson_scripts=_vsf_args(show_map=True))
    texts, maps = infotexts(asked), extra_images(asked)
    assert len(texts) == 2 and len(maps) == 2, (len(texts), len(maps))
    for k in range(2):
        assert "Negative share: mean" in (infotext_value(texts[k], "VSF note") or ""), texts[k]
        picture = _decode(maps[k])
        assert picture.shape[1] >= 256 and picture.shape[0] > picture.shape[1], picture.shape  # map + label
    asked_list = forge.vsf_positional({**custom_vsf_values(3.3, 0.2), "show where": True})
    one = forge.txt2img_ok("(h) VSF positional, show map", alwayson_scripts={SCRIPT_TITLE: {"args": asked_list}})
    assert len(infotexts(one)) == 1 and len(extra_images(one)) == 1
    without = forge.results.get("positional") or forge.txt2img_ok(
        "(h) VSF positional, no map", alwayson_scripts={SCRIPT_TITLE: {"args": forge.vsf_positional(
            custom_vsf_values(3.3, 0.2))}})
    assert extra_images(without) == []
    assert (_decode(one["images"][0]) == _decode(without["images"][0])).all(), "the map changed the image"


def test_c_unguided_after_vsf_is_bit_identical(forge):
    base = _decode(forge.baseline["images"][0])
    plain = forge.txt2img_ok("(c) unguided after VSF calls")
    assert "VSF" not in infotexts(plain)[0]
    assert (_decode(plain["images"][0]) == base).all(), "unguided image changed after VSF calls"
    off = forge.txt2img_ok("(c) extension disabled (args [false])", alwayson_scripts={SCRIPT_TITLE: {"args": [False]}})
    assert "VSF" not in infotexts(off)[0]
    assert (_decode(off["images"][0]) == base).all(), "disabled extension changed the image"


def test_z_server_log_has_no_extension_errors(forge):
    """Host hooks swallow exceptions (`*** Error running process: ...`): a broken hook would only show
    in the log."""
    with open(forge.log_path, "r", errors="replace") as f:
        bad = extension_errors(f.read())
    assert not bad, "extension errors in the server log:\n" + "\n---\n".join(b[:3000] for b in bad)
