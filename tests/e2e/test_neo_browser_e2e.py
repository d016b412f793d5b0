"""Opt-in browser test: the extension's UI inside a real Forge Neo server, driven by headless Chromium.

Skipped unless VSF_NEO_DIR and VSF_NEO_PYTHON are set (tests/e2e/setup_neo_env.sh) and selenium, a
Chromium and its chromedriver are found (Debian: `apt-get install chromium chromium-driver`; selenium from
PyPI in the python that runs pytest). VSF_CHROMIUM / VSF_CHROMEDRIVER override the binaries.

Starts Neo with its UI (`launch.py --api --cpu ...`, 127.0.0.1, the tiny SD1.5 checkpoint from
make_tiny_neo_checkpoint.py) and checks, in one page, what a user sees:
  - the Value Sign Flip accordion in txt2img and img2img, with its enable checkbox in the header;
  - the tooltips on its controls;
  - choosing a preset fills the sliders;
  - pasting an infotext with VSF keys (the ↙ button) fills the accordion and switches it on;
  - the negative prompt box at CFG 1: the host disables it (VSF off), VSF on makes it editable, VSF
    off disables it again; the hires negative follows; a negative typed at CFG 1 reaches the request
    (the generated image's infotext shows it, next to the VSF keys).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from browser import chromium_driver, have_chromium, wait_for  # noqa: E402
from webui_server import WebUIServer, assert_infotext_used, extension_errors, log_path_for, running  # noqa: E402

NEO_DIR = os.environ.get("VSF_NEO_DIR", "")
NEO_PYTHON = os.environ.get("VSF_NEO_PYTHON", "")

try:
    import selenium  # noqa: F401
    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False

pytestmark = [
    pytest.mark.skipif(not (NEO_DIR and NEO_PYTHON),
                       reason="opt-in: set VSF_NEO_DIR and VSF_NEO_PYTHON (see tests/e2e/setup_neo_env.sh)"),
    pytest.mark.skipif(not (HAVE_SELENIUM and have_chromium()),
                       reason="needs selenium (PyPI) and chromium + chromedriver (Debian packages)"),
]

# A settings file without Neo's VERSION_UID makes launch.py wait for Enter ("You are updating from an
# old version"), which a server without a terminal answers with EOFError.
NEO_SETTINGS_UID = "PY313"
LAUNCH_FLAGS = ["--api", "--cpu", "--skip-torch-cuda-test", "--skip-python-version-check", "--skip-install",
                "--skip-version-check", "--loglevel", "WARNING"]
UI_TIMEOUT = 240
TYPED_NEGATIVE = "blurry, dog, watermark"


@pytest.fixture(scope="module")
def neo_ui():
    neo_dir = os.path.abspath(NEO_DIR)
    ckpt = os.path.join(neo_dir, "models", "Stable-diffusion", "vsf-tiny-sd15.safetensors")
    if not os.path.isfile(ckpt):
        subprocess.run([NEO_PYTHON, os.path.join(HERE, "make_tiny_neo_checkpoint.py"), "--neo-dir", neo_dir,
                        "--family", "sd15", "--out", ckpt], check=True, timeout=3600)
    workdir = tempfile.mkdtemp(prefix="vsf-neo-ui-e2e-")
    settings_file = os.path.join(workdir, "config.json")
    with open(settings_file, "w") as f:
        json.dump({"VERSION_UID": NEO_SETTINGS_UID, "live_previews_enable": False, "sd_model_checkpoint": os.path.basename(ckpt),
                   "forge_preset": "sd", "forge_additional_modules": []}, f)
    server = WebUIServer("neo-ui", neo_dir, NEO_PYTHON, [*LAUNCH_FLAGS, "--ui-settings-file", settings_file],
                         ready_path="/sdapi/v1/sd-models")
    with running(server, fail=pytest.fail):
        yield server


@pytest.fixture(scope="module")
def browser(neo_ui):
    screenshot = os.path.join(os.path.dirname(log_path_for("neo-ui")), "neo-ui-last.png")
    with chromium_driver(["--disable-dev-shm-usage", "--window-size=1600,2400"], page_load_timeout=UI_TIMEOUT,
                         screenshot=screenshot) as driver:
        driver.get(neo_ui.url)
        wait_for(driver, lambda d: d.execute_script(
            "const a = gradioApp().querySelector('#vsf_txt2img_enabled-visible-checkbox');"
            "return a !== null && !!gradioApp().querySelector('#txt2img_neg_prompt textarea');"),
            UI_TIMEOUT, "the UI with the VSF accordion")
        yield driver


def js(driver, script: str, *args):
    return driver.execute_script("const app = gradioApp();\n" + script, *args)


def element(driver, css: str):
    el = js(driver, "return app.querySelector(arguments[0]);", css)
    assert el is not None, f"no element {css!r}"
    return el


def set_number(driver, slider_id: str, value: float):
    """A gradio slider's number box, set the way the host's own scripts do (updateInput)."""
    js(driver, "const el = app.querySelector('#' + arguments[0] + ' input[type=number]');"
               "el.value = arguments[1]; updateInput(el);", slider_id, value)


def number(driver, slider_id: str) -> float:
    return float(js(driver, "return app.querySelector('#' + arguments[0] + ' input[type=number]').value;", slider_id))


def show_tab(driver, tab: str):
    """The host's own tab switchers (javascript/ui.js)."""
    js(driver, "switch_to_img2img();" if tab == "img2img" else "switch_to_txt2img();")
    wait_for(driver, lambda d: js(d, "return app.querySelector(arguments[0]).offsetParent !== null;",
                                  f"#vsf_{tab}_enabled"), 10, f"the {tab} tab")


def vsf_enabled(driver, tab: str = "txt2img") -> bool:
    return bool(js(driver, "return app.querySelector(arguments[0]).checked;", f"#vsf_{tab}_enabled-visible-checkbox"))


def set_vsf(driver, on: bool, tab: str = "txt2img"):
    if vsf_enabled(driver, tab) != on:
        box = element(driver, f"#vsf_{tab}_enabled-visible-checkbox")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
        box.click()
    wait_for(driver, lambda d: js(d, "return app.querySelector(arguments[0]).checked;",
                                  f"#vsf_{tab}_enabled-checkbox input") == on, 10, f"VSF {'on' if on else 'off'}")


def open_accordion(driver, tab: str = "txt2img"):
    """Open the accordion by its header (a click on the header's checkbox only switches VSF)."""
    css = f"#vsf_{tab}_enabled .label-wrap"
    if not js(driver, "return app.querySelector(arguments[0]).classList.contains('open');", css):
        header = element(driver, css)
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", header)
        header.click()
    wait_for(driver, lambda d: js(d, "return app.querySelector(arguments[0]).getBoundingClientRect().height > 0;",
                                  f"#vsf_{tab}_preset"), 10, "the accordion open")


def textarea_disabled(driver, css: str) -> bool:
    return bool(js(driver, "return app.querySelector(arguments[0]).disabled;", css))


OPTION_LI = ("return [...document.querySelectorAll('ul.options li')]"
             ".find(li => li.textContent.replace('\u2713', '').trim() === arguments[0]) || null;")


def choose(driver, dropdown_id: str, option: str):
    """Pick `option` in a gradio 4 dropdown the way a user does: open it, click the entry (gradio 4
    renders the open list as a `ul.options` at the end of the document, entries prefixed by a check mark)."""
    box = element(driver, f"#{dropdown_id} input")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
    box.click()
    li = wait_for(driver, lambda d: d.execute_script(OPTION_LI, option), 10, f"option {option!r} in {dropdown_id}")
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).move_to_element(li).click().perform()
    wait_for(driver, lambda d: dropdown_value(d, dropdown_id) == option, 10, f"{dropdown_id} = {option!r}")


def dropdown_value(driver, dropdown_id: str) -> str:
    return js(driver, "return app.querySelector('#' + arguments[0] + ' input').value;", dropdown_id)


# --------------------------------------------------------------------------------------------------

def test_accordion_in_both_tabs(browser):
    for tab in ("txt2img", "img2img"):
        label = js(browser, "return app.querySelector(arguments[0]).textContent;", f"#vsf_{tab}_enabled .label-wrap")
        assert "Value Sign Flip" in label, label
        for control in ("method", "preset", "alpha", "beta", "lambda", "start", "end", "single_pass", "show_map"):
            element(browser, f"#vsf_{tab}_{control}")


def test_tooltips(browser):
    tips = js(browser, "return ['enabled','alpha','beta','preset','start'].map("
                       "n => app.querySelector('#vsf_txt2img_' + n).title);")
    assert all(t and len(t) > 20 for t in tips), tips
    assert tips[1].startswith("Strength"), tips[1]
    label_title = js(browser, "return app.querySelector('#vsf_txt2img_alpha input[type=number]').title;")
    assert label_title == tips[1]


def test_preset_fills_sliders(browser):
    set_vsf(browser, True)
    open_accordion(browser)
    assert vsf_enabled(browser)
    choose(browser, "vsf_txt2img_preset", "VSF Strong")
    wait_for(browser, lambda d: number(d, "vsf_txt2img_alpha") == pytest.approx(3.8), 10, "alpha 3.8")
    assert number(browser, "vsf_txt2img_beta") == pytest.approx(0.2)
    assert dropdown_value(browser, "vsf_txt2img_method") == "VSF"
    choose(browser, "vsf_txt2img_preset", "VSF Quality")
    wait_for(browser, lambda d: number(d, "vsf_txt2img_alpha") == pytest.approx(3.3), 10, "alpha 3.3")
    # moving a slider away from the preset switches it to Custom
    set_number(browser, "vsf_txt2img_alpha", 4.4)
    wait_for(browser, lambda d: dropdown_value(d, "vsf_txt2img_preset") == "Custom", 10, "preset Custom")


def _paste(driver, text: str):
    prompt = element(driver, "#txt2img_prompt textarea")
    js(driver, "arguments[0].value = arguments[1]; updateInput(arguments[0]);", prompt, text)
    element(driver, "#txt2img_tools #paste" if js(driver, "return !!app.querySelector('#txt2img_tools #paste');")
            else "#paste").click()


def test_paste_from_infotext(browser):
    set_vsf(browser, False)
    _paste(browser, "a photo of a cat\nNegative prompt: dog\n"
                    "Steps: 4, Sampler: Euler, Schedule type: Simple, CFG scale: 1, Seed: 42, Size: 64x64, "
                    "VSF method: nasa, VSF alpha: 0.7, VSF beta: 0.2, VSF tau: 1, VSF lambda: 0, VSF start: 0.25, "
                    "VSF end: 1")
    wait_for(browser, lambda d: dropdown_value(d, "vsf_txt2img_method") == "NASA", 20, "method NASA pasted")
    assert number(browser, "vsf_txt2img_alpha") == pytest.approx(0.7)
    assert number(browser, "vsf_txt2img_start") == pytest.approx(0.25)
    wait_for(browser, lambda d: vsf_enabled(d), 10, "VSF switched on by the paste")
    assert number(browser, "txt2img_steps") == 4 and number(browser, "txt2img_cfg_scale") == 1.0
    assert js(browser, "return app.querySelector('#txt2img_prompt textarea').value;") == "a photo of a cat"


NEG = "#txt2img_neg_prompt textarea"
HIRES_NEG = "#hires_neg_prompt textarea"


def test_negative_box_at_cfg_1_follows_vsf(browser):
    set_number(browser, "txt2img_cfg_scale", 1)
    set_vsf(browser, False)
    wait_for(browser, lambda d: textarea_disabled(d, NEG), 10, "host disables the negative box at CFG 1 (VSF off)")
    set_vsf(browser, True)
    wait_for(browser, lambda d: not textarea_disabled(d, NEG), 10, "negative box editable with VSF on")
    set_vsf(browser, False)
    wait_for(browser, lambda d: textarea_disabled(d, NEG), 10, "negative box disabled again with VSF off")
    # CFG above 1: the host's own state (editable) whatever VSF does
    set_number(browser, "txt2img_cfg_scale", 3)
    wait_for(browser, lambda d: not textarea_disabled(d, NEG), 10, "host enables the box at CFG 3")
    set_vsf(browser, True)
    set_vsf(browser, False)
    assert not textarea_disabled(browser, NEG), "VSF off at CFG 3 disabled the host's editable box"
    # back to CFG 1 while VSF is on: the host's disable is undone at once
    set_vsf(browser, True)
    set_number(browser, "txt2img_cfg_scale", 1)
    time.sleep(1.0)
    assert not textarea_disabled(browser, NEG), "CFG 1 with VSF on disabled the negative box"


def test_hires_negative_box_follows_vsf(browser):
    if not js(browser, "return !!app.querySelector(arguments[0]);", HIRES_NEG):
        pytest.fail("no hires negative textarea in the page")
    set_number(browser, "txt2img_hr_cfg", 1)
    set_vsf(browser, False)
    wait_for(browser, lambda d: textarea_disabled(d, HIRES_NEG), 10, "host disables the hires negative at hires CFG 1")
    set_vsf(browser, True)
    wait_for(browser, lambda d: not textarea_disabled(d, HIRES_NEG), 10, "hires negative editable with VSF on")
    set_vsf(browser, False)
    wait_for(browser, lambda d: textarea_disabled(d, HIRES_NEG), 10, "hires negative disabled again with VSF off")


def test_img2img_negative_box_follows_vsf(browser):
    css = "#img2img_neg_prompt textarea"
    show_tab(browser, "img2img")
    set_number(browser, "img2img_cfg_scale", 1)
    set_vsf(browser, False, "img2img")
    wait_for(browser, lambda d: textarea_disabled(d, css), 10, "host disables the img2img negative at CFG 1")
    set_vsf(browser, True, "img2img")
    wait_for(browser, lambda d: not textarea_disabled(d, css), 10, "img2img negative editable with VSF on")
    set_vsf(browser, False, "img2img")
    wait_for(browser, lambda d: textarea_disabled(d, css), 10, "img2img negative disabled again")
    show_tab(browser, "txt2img")


def test_negative_typed_at_cfg_1_reaches_the_generation(browser, neo_ui):
    show_tab(browser, "txt2img")
    # a small, fast image with VSF Quality, from pasted parameters (no VSF keys: the accordion goes off)
    _paste(browser, "a photo of a cat\nSteps: 4, Sampler: Euler, Schedule type: Simple, CFG scale: 1, "
                    "Seed: 42, Size: 64x64")
    wait_for(browser, lambda d: number(d, "txt2img_steps") == 4 and number(d, "txt2img_width") == 64, 20,
             "pasted size and steps")
    wait_for(browser, lambda d: textarea_disabled(d, NEG), 10, "negative box disabled at CFG 1 with VSF off")
    set_vsf(browser, True)
    choose(browser, "vsf_txt2img_preset", "VSF Quality")
    wait_for(browser, lambda d: not textarea_disabled(d, NEG), 10, "negative box editable with VSF on")
    box = element(browser, NEG)
    box.click()
    box.clear()
    box.send_keys(TYPED_NEGATIVE)  # real key events, as a user types
    assert js(browser, "return app.querySelector(arguments[0]).value;", NEG) == TYPED_NEGATIVE
    shown = {name: number(browser, f"vsf_txt2img_{name}") for name in ("alpha", "beta", "start", "end")}
    element(browser, "#txt2img_generate").click()
    info = wait_for(browser, lambda d: (js(d, "const el = app.querySelector('#html_info_txt2img');"
                                              "return el && el.textContent.includes('VSF method') ? el.textContent : '';")),
                    UI_TIMEOUT, "the generated image's infotext")
    assert f"Negative prompt: {TYPED_NEGATIVE}" in info, info
    assert "VSF method: vsf" in info and "VSF alpha: 3.3" in info, info
    assert "CFG scale: 1" in info, info
    assert_infotext_used(info, shown)  # what the sliders show is what the generation used


def test_server_log_has_no_extension_errors(neo_ui):
    bad = extension_errors(neo_ui.log_text())
    assert not bad, "extension errors in the server log:\n" + "\n---\n".join(b[:3000] for b in bad)
