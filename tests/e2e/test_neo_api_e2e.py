"""Opt-in end-to-end test: the extension inside a real Forge Neo API server on CPU, per model family.

Skipped unless both are set:

    VSF_NEO_DIR=<Neo checkout>         (Forge Neo 6e1e0d5a seen working)
    VSF_NEO_PYTHON=<its venv's python>  (tests/e2e/setup_neo_env.sh builds both)

Optional: VSF_NEO_FAMILIES (space-separated, default "sd15"; also "sdxl" (a 2 GB checkpoint), "flux",
"chroma", "wan" (each a 5-7 GB checkpoint with full-size T5/UMT5), "zimage", "flux2" (Z-Image, Flux.2
Klein 4B: 5-6 GB each with full-size Qwen3-4B); a missing checkpoint is built by
make_tiny_neo_checkpoint.py), plus the
harness knobs of webui_server.py (VSF_E2E_PORT, VSF_E2E_LOG_DIR, VSF_E2E_STARTUP_TIMEOUT, ...).

One `launch.py --nowebui --api --cpu` server per family on 127.0.0.1, this repository linked as
extensions/sd-webui-vsf (removed afterwards), its own settings file (the family's checkpoint and UI preset,
live previews off). 64x64, 4 Euler steps, CFG 1 unless a check says otherwise.

Checks, per family:
  a. alwayson_scripts["Value Sign Flip"] as a positional list and as one dict: VSF infotext, image differs
     from unguided, both forms the same image; /sdapi/v1/png-info reads the VSF keys back; img2img and
     hires fix are guided too.
  b. X/Y/Z over `[VSF] Alpha` (one image per value, alpha in each infotext) and `[VSF] Method` with an
     `Off` cell (that cell is the unguided image, no VSF keys).
  c. after all VSF calls, an unguided request (and one with the extension disabled) is bit for bit the
     unguided image made before any VSF call; txt2img and img2img.
  d. every bad value is refused with a message naming it, and the next request (txt2img and img2img) is
     exactly what it was before the refusal.
  e. spec invariants: empty negative / a step window no step falls in = unguided bit for bit; a window
     covering only the last step (or only the first) differs from unguided; a batch of 2 equals each seed
     alone within the host's own batch tolerance (measured on unguided batches in the same run).
  f. CFG kept (single pass off): with the positive prompt used as the negative too, plain CFG gives the
     same image at any scale (cond = uncond), while VSF on the conditional rows only makes the scale
     matter; an empty window gives the plain CFG image bit for bit.
  g. interrupt during a guided request ends it; the next request is unchanged.
  h. "Show where the negative acts": one map image per output after the outputs in `images` only when
     asked (dict `show_map`, positional checkbox; one per video for Wan), each output's `VSF note` with
     its share, the outputs bit for bit those made without the map; NAG says the map is undefined and
     adds no image.
  z. no error report involving the extension in the server log.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from webui_server import (  # noqa: E402
    SCRIPT_TITLE, WebUIServer, decode_image, extension_errors, extra_images, infotext_value,
    infotexts, params_line, running, vsf_keys,
)

NEO_DIR = os.environ.get("VSF_NEO_DIR", "")
NEO_PYTHON = os.environ.get("VSF_NEO_PYTHON", "")
FAMILIES = os.environ.get("VSF_NEO_FAMILIES", "sd15").split()

pytestmark = pytest.mark.skipif(
    not (NEO_DIR and NEO_PYTHON),
    reason="opt-in: set VSF_NEO_DIR and VSF_NEO_PYTHON (see tests/e2e/setup_neo_env.sh)",
)

# Per family: Neo's UI preset (forge_preset) and what its requests need.
FAMILY = {
    "sd15": {"preset": "sd", "request": {}},
    "sdxl": {"preset": "xl", "request": {}},
    "flux": {"preset": "flux", "request": {"distilled_cfg_scale": 3.5}},
    "chroma": {"preset": "flux", "request": {}},
    "wan": {"preset": "wan", "request": {}},
    # Z-Image takes its shift from distilled_cfg_scale (the UI's "Shift"): the model's own 3, not the API's 3.5
    "zimage": {"preset": "zit", "request": {"distilled_cfg_scale": 3.0}},
    "flux2": {"preset": "klein", "request": {}},  # Klein: no guidance embedding, no shift slider
}
STEPS = 4
BASE_REQUEST = {
    "prompt": "a photo of a cat",
    "negative_prompt": "dog, blurry",
    "width": 64,
    "height": 64,
    "steps": STEPS,
    "cfg_scale": 1.0,
    "seed": 42,
    "sampler_name": "Euler",
    "scheduler": "Simple",
    "batch_size": 1,
    "n_iter": 1,
}
# A settings file without Neo's VERSION_UID makes launch.py wait for Enter ("You are updating from an
# old version"), which a server without a terminal answers with EOFError.
NEO_SETTINGS_UID = "PY313"
LAUNCH_FLAGS = ["--nowebui", "--api", "--cpu", "--skip-torch-cuda-test", "--skip-python-version-check",
                "--skip-install", "--skip-version-check", "--loglevel", "WARNING"]
VSF = {"enabled": True, "method": "vsf", "alpha": 3.3, "beta": 0.2}
HIRES = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "hr_second_pass_steps": 2,
         "denoising_strength": 0.5, "hr_additional_modules": ["Use same choices"]}


def vsf_args(**settings) -> dict:
    return {SCRIPT_TITLE: {"args": [dict(VSF, **settings)]}}


def vsf_list(neo, **labels) -> list:
    """The positional list that means what the dict VSF means: preset "Custom" with VSF's alpha and
    beta, and the model's own lambda, which the dict form keeps (it names alpha and beta over the model
    default: Flux 8). A positional "Custom" list takes the lambda slider as it is (0 by default)."""
    from lib_vsf.settings import FAMILY_DEFAULTS

    lam = FAMILY_DEFAULTS.get(neo.family, FAMILY_DEFAULTS["unet"]).flux_lambda
    return neo.vsf_positional({"method": "VSF", "preset": "Custom", "alpha": VSF["alpha"], "beta": VSF["beta"],
                               "flux lambda": lam, **labels})


def image(data: dict, k: int = 0):
    return decode_image(data["images"][k]).astype(int)


def max_diff(a, b) -> int:
    return int(abs(a - b).max())


class Neo(WebUIServer):
    """The running server plus the references made before any VSF call."""

    def __init__(self, family: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.family = family
        self.baseline: dict = {}
        self.init_image: str = ""
        self.img2img_baseline: dict = {}
        self.results: dict[str, dict] = {}


def _checkpoint(neo_dir: str, family: str) -> str:
    ckpt = os.path.join(neo_dir, "models", "Stable-diffusion", f"vsf-tiny-{family}.safetensors")
    if not os.path.isfile(ckpt):
        subprocess.run([NEO_PYTHON, os.path.join(HERE, "make_tiny_neo_checkpoint.py"), "--neo-dir", neo_dir,
                        "--family", family, "--out", ckpt], check=True, timeout=3600)
    return ckpt


@pytest.fixture(scope="module", params=FAMILIES)
def neo(request):
    family = request.param
    if family not in FAMILY:
        pytest.fail(f"unknown VSF_NEO_FAMILIES entry {family!r}; known: {', '.join(FAMILY)}")
    neo_dir = os.path.abspath(NEO_DIR)
    if not os.path.isfile(os.path.join(neo_dir, "launch.py")):
        pytest.fail(f"{neo_dir} is not a Neo checkout: run tests/e2e/setup_neo_env.sh first")
    ckpt = _checkpoint(neo_dir, family)
    workdir = tempfile.mkdtemp(prefix=f"vsf-neo-{family}-e2e-")
    settings_file = os.path.join(workdir, "config.json")
    with open(settings_file, "w") as f:
        json.dump({"VERSION_UID": NEO_SETTINGS_UID, "live_previews_enable": False, "sd_model_checkpoint": os.path.basename(ckpt),
                   "forge_preset": FAMILY[family]["preset"], "forge_additional_modules": []}, f)
    server = Neo(family, f"neo-{family}", neo_dir, NEO_PYTHON, [*LAUNCH_FLAGS, "--ui-settings-file", settings_file],
                 base_request=dict(BASE_REQUEST, **FAMILY[family]["request"]))
    with running(server, fail=pytest.fail):
        server.baseline = server.txt2img_ok(f"[{family}] baseline (unguided, before any VSF call)")
        server.init_image = server.baseline["images"][0]
        server.img2img_baseline = server.img2img_ok(f"[{family}] img2img baseline", server.init_image,
                                                    denoising_strength=0.6)
        yield server



def _assert_vsf_infotext(text: str, alpha: float = 3.3, beta: float = 0.2):
    keys = vsf_keys()
    assert (infotext_value(text, keys["method"]) or "").lower() == "vsf", text
    assert float(infotext_value(text, keys["alpha"])) == pytest.approx(alpha), text
    assert float(infotext_value(text, keys["beta"])) == pytest.approx(beta), text


# --------------------------------------------------------------------------------------------------
# a. guided requests

def test_baseline_is_plain(neo):
    text = infotexts(neo.baseline)[0]
    assert "VSF" not in text, text
    assert f"vsf-tiny-{neo.family}" in text, text
    img = image(neo.baseline)
    assert img.shape == (64, 64, 3)
    assert img.std() > 1.0, "baseline image is flat (NaN latents decode to black)"


@pytest.mark.parametrize("form", ["positional", "dict"])
def test_a_vsf_runs_from_api(neo, form):
    # "Custom" (see vsf_list): a positional list at the UI defaults with the preset left at "Model
    # default" gets the model's own numbers (Flux: alpha 6.0), since 3.3 and 0.2 are the sliders'
    # defaults; the dict form names its numbers over the model default, so its lambda is the model's.
    args = vsf_list(neo) if form == "positional" else [dict(VSF)]
    data = neo.txt2img_ok(f"[{neo.family}] (a) VSF {form} args", alwayson_scripts={SCRIPT_TITLE: {"args": args}})
    _assert_vsf_infotext(infotexts(data)[0])
    assert max_diff(image(data), image(neo.baseline)) > 0, "VSF image equals the unguided one"
    neo.results[form] = data
    other = neo.results.get("dict" if form == "positional" else "positional")
    if other is not None:
        assert (image(other) == image(data)).all(), "positional and dict forms gave different images"


def test_a_png_info_reads_vsf_keys_back(neo):
    data = neo.results.get("dict") or neo.txt2img_ok(f"[{neo.family}] (a) VSF dict", alwayson_scripts=vsf_args())
    info = neo.png_info(data["images"][0])
    keys = vsf_keys()
    assert keys["method"] in info["info"], info["info"]
    params = info.get("parameters") or {}
    assert str(params.get(keys["method"], "")).lower() == "vsf", params
    assert float(params[keys["alpha"]]) == pytest.approx(3.3) and float(params[keys["beta"]]) == pytest.approx(0.2)
    assert params.get("Negative prompt") == BASE_REQUEST["negative_prompt"], params


def test_a_img2img_is_guided(neo):
    data = neo.img2img_ok(f"[{neo.family}] (a) img2img VSF", neo.init_image, denoising_strength=0.6,
                          alwayson_scripts=vsf_args())
    _assert_vsf_infotext(infotexts(data)[0])
    assert max_diff(image(data), image(neo.img2img_baseline)) > 0, "VSF img2img equals the unguided one"
    neo.results["img2img"] = data


def test_a_hires_fix_pass_is_guided_too(neo):
    plain = neo.txt2img_ok(f"[{neo.family}] (a) hires fix, unguided", **HIRES)
    guided = neo.txt2img_ok(f"[{neo.family}] (a) hires fix, VSF", **HIRES, alwayson_scripts=vsf_args())
    _assert_vsf_infotext(infotexts(guided)[0])
    a, b = image(plain), image(guided)
    assert a.shape == b.shape == (96, 96, 3), (a.shape, b.shape)
    assert (a != b).any(), "VSF hires image equals the unguided hires image"


# --------------------------------------------------------------------------------------------------
# h. where the negative acts

def test_h_negative_map_only_when_asked(neo):
    plain = neo.results.get("dict") or neo.txt2img_ok(f"[{neo.family}] (h) VSF dict, no map",
                                                      alwayson_scripts=vsf_args())
    assert extra_images(plain) == [] and "Negative share" not in infotexts(plain)[0]
    batch = 1 if neo.family == "wan" else 2  # a Wan request is one video: its map goes with the first frame
    asked = neo.txt2img_ok(f"[{neo.family}] (h) VSF dict, show_map, batch of {batch}", batch_size=batch,
                           alwayson_scripts=vsf_args(show_map=True))
    maps = extra_images(asked)
    assert len(maps) == batch, (len(infotexts(asked)), len(maps))
    assert "Negative share: mean" in (infotext_value(infotexts(asked)[-1], "VSF note") or ""), infotexts(asked)[-1]
    for m in maps:
        picture = decode_image(m)
        assert picture.shape[1] >= 256 and picture.shape[0] > picture.shape[1], picture.shape  # map + label
    as_list = vsf_list(neo, **{"show where": True})
    one = neo.txt2img_ok(f"[{neo.family}] (h) VSF positional, show map",
                         alwayson_scripts={SCRIPT_TITLE: {"args": as_list}})
    assert len(extra_images(one)) == 1
    without = neo.results.get("positional") or neo.txt2img_ok(
        f"[{neo.family}] (h) VSF positional, no map",
        alwayson_scripts={SCRIPT_TITLE: {"args": vsf_list(neo)}})
    assert extra_images(without) == []
    assert (image(one) == image(without)).all(), "the map changed the image"
    nag = neo.txt2img_ok(f"[{neo.family}] (h) NAG, show_map", alwayson_scripts={SCRIPT_TITLE: {"args": [
        {"enabled": True, "method": "nag", "preset": "NAG", "show_map": True}]}})
    assert extra_images(nag) == []
    assert "no negative-attention map" in (infotext_value(infotexts(nag)[0], "VSF note") or ""), infotexts(nag)[0]


# --------------------------------------------------------------------------------------------------
# b. X/Y/Z

def _xyz(neo: Neo, axis: str, values: list, dropdown: bool, label: str) -> dict:
    entry = neo.script_info("x/y/z plot")
    choices = entry["args"][0]["choices"] or []
    assert axis in choices, [c for c in choices if "VSF" in c]
    nothing = choices.index("Nothing")
    text = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
    # Neo's run(p, x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown, z_type,
    #     z_values, z_values_dropdown, draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds,
    #     vary_seeds_x, vary_seeds_y, vary_seeds_z, row_count, margin_size, csv_mode): the first 17 set
    # here, the rest (Neo adds row_count) keep the defaults script-info reports.
    head = [choices.index(axis), "" if dropdown else text, list(values) if dropdown else [],
            nothing, "", [], nothing, "", [], True, True, False, False, False, False, False]
    defaults = [a["value"] for a in entry["args"]]
    assert len(defaults) > len(head), entry["args"]
    script_args = head + defaults[len(head):]
    return neo.txt2img_ok(label, script_name="x/y/z plot", script_args=script_args)


def test_b_xyz_over_alpha(neo):
    values = [1.5, 3.3, 6.0]
    data = _xyz(neo, "[VSF] Alpha", values, False, f"[{neo.family}] (b) XYZ over [VSF] Alpha")
    assert len(data["images"]) == 1 + len(values), f"{len(data['images'])} images for {len(values)} values"
    cells = infotexts(data)[1:1 + len(values)]
    got = [infotext_value(t, vsf_keys()["alpha"]) for t in cells]
    assert [float(g) if g is not None else None for g in got] == pytest.approx(values), got
    pixels = [image(data, k) for k in range(1, 1 + len(values))]
    for i in range(len(values)):
        for j in range(i + 1, len(values)):
            assert (pixels[i] != pixels[j]).any(), f"alpha {values[i]} and {values[j]} gave the same image"


def test_b_xyz_method_axis_off_cell_is_plain(neo):
    methods = ["VSF", "NASA", "Off"]
    data = _xyz(neo, "[VSF] Method", methods, True, f"[{neo.family}] (b) XYZ over [VSF] Method incl. Off")
    assert len(data["images"]) == 1 + len(methods)
    cells = infotexts(data)[1:]
    key = vsf_keys()["method"]
    assert [infotext_value(t, key) for t in cells] == ["vsf", "nasa", None], [params_line(t) for t in cells]
    assert (image(data, len(methods)) == image(neo.baseline)).all(), "Off cell is not the unguided image"


# --------------------------------------------------------------------------------------------------
# d. refused values

BAD_VALUES = [
    ({"alpha": "banana"}, "alpha"),
    ({"alpha": -1}, "alpha"),
    ({"alpha": 1000}, "alpha"),
    ({"beta": -0.5}, "beta"),
    ({"lambda": 500}, "lambda"),
    ({"start": 1.5}, "start"),
    ({"start": 0.8, "end": 0.2}, "start"),
    ({"method": "not-a-method"}, "method"),
    ({"method": "nag", "beta": 2}, "beta"),
    ({"alpha_schedule": "1 x 2"}, "alpha"),
    ({"alhpa": 3}, "alhpa"),
    ({"enabled": "yes"}, "enabled"),
]
BAD_IDS = ["alpha-not-number", "alpha-negative", "alpha-too-large", "beta-negative", "lambda-too-large",
           "start-above-1", "start-after-end", "unknown-method", "nag-beta-above-1", "schedule-not-numbers",
           "unknown-key", "enabled-not-boolean"]


def _refusal_message(status, data, label: str) -> str:
    assert status >= 400, f"{label}: bad value accepted (HTTP {status})"
    return json.dumps(data) if not isinstance(data, str) else data


@pytest.mark.parametrize("bad,field", BAD_VALUES, ids=BAD_IDS)
def test_d_bad_value_refused_and_next_txt2img_unchanged(neo, bad, field):
    label = f"[{neo.family}] (d) txt2img bad {bad}"
    message = _refusal_message(*neo.txt2img(label, alwayson_scripts={SCRIPT_TITLE: {"args": [dict(VSF, **bad)]}}),
                               label)
    assert "VSF" in message or "Value Sign Flip" in message, message
    assert field in message.lower(), f"error does not name {field!r}: {message}"
    after = neo.txt2img_ok(f"[{neo.family}] (d) unguided after refusal")
    assert (image(after) == image(neo.baseline)).all(), "unguided txt2img after a refusal changed"


@pytest.mark.parametrize("bad,field", BAD_VALUES[:3] + BAD_VALUES[6:8], ids=BAD_IDS[:3] + BAD_IDS[6:8])
def test_d_bad_value_refused_and_next_img2img_unchanged(neo, bad, field):
    label = f"[{neo.family}] (d) img2img bad {bad}"
    status, data = neo.img2img(label, neo.init_image, denoising_strength=0.6,
                               alwayson_scripts={SCRIPT_TITLE: {"args": [dict(VSF, **bad)]}})
    message = _refusal_message(status, data, label)
    assert field in message.lower(), f"error does not name {field!r}: {message}"
    after = neo.img2img_ok(f"[{neo.family}] (d) img2img unguided after refusal", neo.init_image,
                           denoising_strength=0.6)
    assert (image(after) == image(neo.img2img_baseline)).all(), \
        "unguided img2img after a refused img2img differs from the one before it"


def test_d_guided_request_after_refusals_is_unchanged(neo):
    bad = neo.vsf_positional({"method": "VSF", "alpha": "x", "beta": 0.2})
    message = _refusal_message(*neo.txt2img(f"[{neo.family}] (d) bad positional alpha",
                                            alwayson_scripts={SCRIPT_TITLE: {"args": bad}}), "positional")
    assert "alpha" in message.lower(), message
    good = neo.txt2img_ok(f"[{neo.family}] (d) VSF after refusals", alwayson_scripts=vsf_args())
    earlier = neo.results.get("dict")
    if earlier is not None:
        assert (image(good) == image(earlier)).all(), "VSF after refusals differs from the same VSF before them"
    again = neo.img2img_ok(f"[{neo.family}] (d) VSF img2img after refusals", neo.init_image,
                           denoising_strength=0.6, alwayson_scripts=vsf_args())
    if "img2img" in neo.results:
        assert (image(again) == image(neo.results["img2img"])).all(), "VSF img2img after refusals changed"


# --------------------------------------------------------------------------------------------------
# e. spec invariants through the server

@pytest.mark.parametrize("case", ["empty-negative", "window-after-last-step"])
def test_e_no_negative_influence_is_exactly_unguided(neo, case):
    """Empty negative, or a window no step falls in (4 steps: fractions 0, .25, .5, .75 < 0.9)."""
    if case == "empty-negative":
        data = neo.txt2img_ok(f"[{neo.family}] (e) VSF on, {case}", negative_prompt="", alwayson_scripts=vsf_args())
    else:
        data = neo.txt2img_ok(f"[{neo.family}] (e) VSF on, {case}", alwayson_scripts=vsf_args(start=0.9, end=1.0))
    assert (image(data) == image(neo.baseline)).all()


@pytest.mark.parametrize("window", [(0.75, 1.0), (0.0, 0.25)], ids=["last-step-only", "first-step-only"])
def test_e_one_step_window_is_guided(neo, window):
    """VSF-SPEC "Per-step scheduling": step i of N is guided when start <= i/N < end. With 4 steps,
    [0.75, 1) holds step 3 alone and [0, 0.25) step 0 alone: each must change the image, and each
    must differ from the full window."""
    start, end = window
    data = neo.txt2img_ok(f"[{neo.family}] (e) window {window}", alwayson_scripts=vsf_args(start=start, end=end))
    assert max_diff(image(data), image(neo.baseline)) > 0, f"window {window} gave the unguided image"
    full = neo.results.get("dict")
    if full is not None:
        assert max_diff(image(data), image(full)) > 0, f"window {window} gave the full-window image"


def test_e_batch_equals_each_image_alone(neo):
    """Tolerance: the host's own unguided batch-vs-single difference in this run (CPU batches differ
    by up to 1/255 in the hosts' own unguided batches), plus one level."""
    if neo.family == "wan":
        # processing.process_images_inner: batch_size is the video's frame count, rounded to 4k + 1
        pytest.skip("Neo's Wan takes batch_size as the frame count (2 becomes 1 frame): no batch of seeds")
    plain_batch = neo.txt2img_ok(f"[{neo.family}] (e) unguided batch of 2", batch_size=2)
    plain_43 = neo.txt2img_ok(f"[{neo.family}] (e) unguided seed 43 alone", seed=43)
    host_noise = max(max_diff(image(plain_batch, 0), image(neo.baseline)), max_diff(image(plain_batch, 1), image(plain_43)))
    tolerance = max(host_noise, 1) + 1
    batch = neo.txt2img_ok(f"[{neo.family}] (e) VSF batch of 2", batch_size=2, alwayson_scripts=vsf_args())
    alone = [neo.results.get("dict") or neo.txt2img_ok(f"[{neo.family}] (e) VSF seed 42", alwayson_scripts=vsf_args()),
             neo.txt2img_ok(f"[{neo.family}] (e) VSF seed 43 alone", seed=43, alwayson_scripts=vsf_args())]
    for k in range(2):
        _assert_vsf_infotext(infotexts(batch)[k])
        diff = max_diff(image(batch, k), image(alone[k]))
        assert diff <= tolerance, f"batch image {k} differs from its seed alone by {diff}/255 (host's own: {host_noise})"
        assert max_diff(image(batch, k), image(plain_batch, k)) > tolerance, f"batch image {k} is not guided"


# --------------------------------------------------------------------------------------------------
# f. CFG kept, uncond rows unguided

def test_f_cfg_kept_with_uncond_rows_unguided(neo):
    """Positive prompt = negative prompt: the host's CFG gives uncond + s*(cond - uncond) = uncond at
    any scale s. VSF with single pass off guides only the conditional rows, so cond' != uncond and the
    scale changes the image; were the uncond rows guided the same way, both scales would again give
    one image."""
    if neo.family in ("flux",):
        pytest.skip("Flux dev is guidance-distilled: Neo runs no uncond rows for it")
    same = {"prompt": "a photo of a cat", "negative_prompt": "a photo of a cat"}
    plain = [neo.txt2img_ok(f"[{neo.family}] (f) plain CFG {s}, prompt = negative", cfg_scale=s, **same)
             for s in (2.0, 4.0)]
    host_noise = max_diff(image(plain[0]), image(plain[1]))
    assert host_noise <= 1, f"plain CFG with cond = uncond depends on the scale ({host_noise}/255)"
    guided = [neo.txt2img_ok(f"[{neo.family}] (f) VSF + CFG {s}, prompt = negative", cfg_scale=s, **same,
                             alwayson_scripts=vsf_args(single_pass=False)) for s in (2.0, 4.0)]
    for g in guided:
        _assert_vsf_infotext(infotexts(g)[0])
        assert "CFG scale: " in infotexts(g)[0]
    assert max_diff(image(guided[0]), image(guided[1])) > host_noise + 2, \
        "VSF + CFG: the CFG scale has no effect with prompt = negative (uncond rows guided too, or CFG dropped)"
    # CFG kept: an empty window is exactly the plain CFG image (normal prompts, scale 3)
    cfg_plain = neo.txt2img_ok(f"[{neo.family}] (f) plain CFG 3", cfg_scale=3.0)
    empty = neo.txt2img_ok(f"[{neo.family}] (f) VSF + CFG 3, empty window", cfg_scale=3.0,
                           alwayson_scripts=vsf_args(single_pass=False, start=0.9, end=1.0))
    assert (image(empty) == image(cfg_plain)).all(), "VSF with no active step changed the CFG image"
    single = neo.txt2img_ok(f"[{neo.family}] (f) VSF single pass at CFG 3", cfg_scale=3.0, alwayson_scripts=vsf_args())
    cfg_vsf = neo.txt2img_ok(f"[{neo.family}] (f) VSF + CFG 3", cfg_scale=3.0,
                             alwayson_scripts=vsf_args(single_pass=False))
    assert max_diff(image(cfg_vsf), image(single)) > 0, "single pass off gave the single-pass image (CFG dropped)"
    assert max_diff(image(cfg_vsf), image(cfg_plain)) > 0, "VSF + CFG equals plain CFG"


# --------------------------------------------------------------------------------------------------
# g. interrupt

def test_g_interrupt_then_next_request_unchanged(neo):
    result: dict = {}

    def long_request():
        result["reply"] = neo.txt2img(f"[{neo.family}] (g) long VSF request (interrupted)", steps=60,
                                      alwayson_scripts=vsf_args())

    worker = threading.Thread(target=long_request, daemon=True)
    worker.start()
    # Until the first step: the prompt, negative and null encodes come first, which with the full-size
    # T5-XXL of the Flux/Chroma/Wan checkpoints on CPU can take minutes (seen: over 120 s on Flux).
    deadline = time.monotonic() + neo.request_timeout
    while time.monotonic() < deadline:
        state = neo.progress().get("state") or {}
        if state.get("sampling_step", 0) >= 1:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the long request never started sampling")
    status, _ = neo.interrupt()
    assert status == 200
    worker.join(timeout=300)
    assert not worker.is_alive(), "the interrupted request did not end"
    status, data = result["reply"]
    assert status == 200, data
    assert "Steps: 60" in infotexts(data)[0]
    after = neo.txt2img_ok(f"[{neo.family}] (g) unguided after interrupt")
    assert (image(after) == image(neo.baseline)).all(), "unguided image changed after an interrupted VSF request"
    earlier = neo.results.get("dict")
    if earlier is not None:
        again = neo.txt2img_ok(f"[{neo.family}] (g) VSF after interrupt", alwayson_scripts=vsf_args())
        assert (image(again) == image(earlier)).all(), "VSF image changed after an interrupted VSF request"


# --------------------------------------------------------------------------------------------------
# c. (last) the model is untouched after everything above

def test_y_unguided_after_vsf_is_bit_identical(neo):
    plain = neo.txt2img_ok(f"[{neo.family}] (c) unguided after VSF calls")
    assert "VSF" not in infotexts(plain)[0]
    assert (image(plain) == image(neo.baseline)).all(), "unguided image changed after VSF calls"
    off = neo.txt2img_ok(f"[{neo.family}] (c) extension disabled (args [false])",
                         alwayson_scripts={SCRIPT_TITLE: {"args": [False]}})
    assert "VSF" not in infotexts(off)[0]
    assert (image(off) == image(neo.baseline)).all(), "disabled extension changed the image"
    i2i = neo.img2img_ok(f"[{neo.family}] (c) img2img unguided after VSF calls", neo.init_image, denoising_strength=0.6)
    assert (image(i2i) == image(neo.img2img_baseline)).all(), "unguided img2img changed after VSF calls"


def test_z_server_log_has_no_extension_errors(neo):
    bad = extension_errors(neo.log_text())
    assert not bad, "extension errors in the server log:\n" + "\n---\n".join(b[:3000] for b in bad)
