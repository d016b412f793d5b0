"""Opt-in browser test: the VSF accordion in a real AUTOMATIC1111 1.10 UI (gradio 3.41), headless Chromium.

Skipped unless VSF_A1111_DIR and VSF_A1111_PYTHON are set (tests/e2e/setup_a1111_env.sh) and selenium plus a
Chromium/chromedriver pair are installed (Debian: `apt-get install chromium chromium-driver`; PyPI: `selenium`;
VSF_CHROMIUM / VSF_CHROMEDRIVER override the binaries on PATH, see browser.py). Starts A1111 with its UI
on 127.0.0.1 (harness: webui_server.py; log a1111-ui-server.log), this repository linked as an extension, and
checks in the txt2img tab:
  - the accordion is closed and off at load; opening it ticks its checkbox (the value the script gets) and
    shows the controls;
  - every control carries its tooltip (javascript/vsf_tooltips.js), and the labels unique to VSF are in
    A1111's own `titles` hint table;
  - picking a preset fills method, alpha and beta (VSF Strong: VSF 3.8/0.2; NAG: NAG 4/0.125);
  - pasting an infotext with VSF keys into the prompt and pressing the host's paste button sets the
    accordion on and every VSF control to the pasted values; pasting one without VSF switches it off;
  - the negative prompt at CFG 1: A1111 leaves the box editable (unlike Forge Neo, which disables it); a
    negative typed there with real key events, VSF on (VSF Quality), reaches the generated image's
    infotext with the VSF values the sliders show;
  - the server log holds no error report that involves the extension.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from browser import CHROMEDRIVER, CHROMIUM, chromium_driver, have_chromium, wait_for  # noqa: E402
from webui_server import WebUIServer, assert_infotext_used, extension_errors, running, vsf_keys  # noqa: E402

A1111_DIR = os.environ.get("VSF_A1111_DIR", "")
A1111_PYTHON = os.environ.get("VSF_A1111_PYTHON", "")

pytestmark = pytest.mark.skipif(
    not (A1111_DIR and A1111_PYTHON),
    reason="opt-in: set VSF_A1111_DIR and VSF_A1111_PYTHON (see tests/e2e/setup_a1111_env.sh)",
)

UI_FLAGS = [
    "--api", "--skip-torch-cuda-test", "--use-cpu", "all", "--no-half", "--precision", "full",
    "--skip-prepare-environment", "--skip-install", "--skip-version-check", "--skip-python-version-check",
    "--no-download-sd-model",
]
TAB = "txt2img"
NEG = "#txt2img_neg_prompt textarea"
TYPED_NEGATIVE = "blurry, dog, watermark"
GENERATE_TIMEOUT = 240


def el_id(name: str) -> str:
    return f"vsf_{TAB}_{name}"


@pytest.fixture(scope="module")
def ui_server():
    webui = os.path.abspath(A1111_DIR)
    ckpt = None
    for family in ("sdxl", "sd3", "sd15"):  # any one: the UI checks need a model loaded, not a fast one
        path = os.path.join(webui, "models", "Stable-diffusion", f"vsf-tiny-{family}.safetensors")
        if os.path.isfile(path):
            ckpt = path
            break
    if ckpt is None:
        pytest.fail("no vsf-tiny-* checkpoint: run tests/e2e/setup_a1111_env.sh")
    hf_home = os.environ.get("VSF_A1111_HF_HOME") or webui.rstrip("/") + "-hf"
    workdir = tempfile.mkdtemp(prefix="vsf-a1111-ui-")
    settings_file = os.path.join(workdir, "config.json")
    with open(settings_file, "w") as f:
        json.dump({"live_previews_enable": False, "sd3_enable_t5": False,
                   "sd_model_checkpoint": os.path.basename(ckpt)}, f)
    server = WebUIServer("a1111-ui", webui, A1111_PYTHON,
                         [*UI_FLAGS, "--ui-settings-file", settings_file, "--ckpt", ckpt],
                         ready_path="/sdapi/v1/sd-models", env={"HF_HOME": hf_home})
    try:
        with running(server, fail=pytest.fail):
            yield server
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def browser(ui_server):
    pytest.importorskip("selenium.webdriver")
    if not have_chromium():
        pytest.skip(f"no {CHROMIUM or 'chromium'} / {CHROMEDRIVER or 'chromedriver'} "
                    "(apt-get install chromium chromium-driver)")
    with chromium_driver(["--window-size=1400,2200"], page_load_timeout=120) as driver:
        driver.get(ui_server.url + "/")
        # the page is ready once A1111's onUiLoaded callbacks ran: the tooltips script sets titles then
        wait_for(driver, lambda d: d.execute_script(
            f"const a = gradioApp().querySelector('#{el_id('alpha')}'); return !!(a && a.title);"), 180,
            "the VSF accordion (with its tooltips) never appeared")
        yield driver


def q(driver, css: str):
    return driver.execute_script("return gradioApp().querySelector(arguments[0]);", css)


def enabled_state(driver) -> bool:
    """The value the script receives: the InputAccordion's hidden gradio checkbox."""
    return driver.execute_script(f"return gradioApp().querySelector('#{el_id('enabled')}-checkbox input').checked;")


def slider_value(driver, name: str) -> float:
    return slider_value_by_id(driver, el_id(name))


def slider_value_by_id(driver, elem_id: str) -> float:
    return float(q(driver, f"#{elem_id} input[type=number]").get_attribute("value"))


def scroll_into_view(driver, element):
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)


def dropdown_value(driver, name: str) -> str:
    return q(driver, f"#{el_id(name)} input").get_attribute("value")


def is_shown(driver, name: str) -> bool:
    return driver.execute_script(
        "const e = gradioApp().querySelector(arguments[0]); return !!e && e.offsetParent !== null;", f"#{el_id(name)}")


def open_accordion(driver):
    if not enabled_state(driver):
        q(driver, f"#{el_id('enabled')} .label-wrap").click()
        wait_for(driver, lambda d: enabled_state(d) and is_shown(d, "alpha"), 20, "accordion did not open")


def choose(driver, name: str, option: str):
    """Pick `option` in a gradio 3.41 dropdown (click the input, then the list item)."""
    box = q(driver, f"#{el_id(name)} input")
    scroll_into_view(driver, box)
    box.click()
    item = wait_for(driver, lambda d: d.execute_script(
        # gradio 3.41 puts a (hidden) check mark inside every item: compare the text without it
        "return [...gradioApp().querySelectorAll(arguments[0])].find(li => "
        "li.getAttribute('data-value') === arguments[1] || li.textContent.replace('\u2713', '').trim() === arguments[1]);",
        f"#{el_id(name)} ul li", option), 10, f"no option {option!r} in {name}")
    item.click()
    wait_for(driver, lambda d: dropdown_value(d, name) == option, 10, f"{name} did not show {option!r}")


def paste_infotext(driver, text: str):
    driver.execute_script(
        "const t = gradioApp().querySelector('#txt2img_prompt textarea'); t.value = arguments[0]; updateInput(t);",
        text)
    q(driver, "#tab_txt2img #paste").click()


def test_accordion_closed_then_opens_and_enables(browser):
    assert not enabled_state(browser), "VSF is on at page load"
    assert not is_shown(browser, "alpha"), "the accordion's controls are visible while it is closed"
    open_accordion(browser)
    for name in ("method", "preset", "alpha", "beta", "lambda", "start", "end", "single_pass", "show_map"):
        assert is_shown(browser, name), f"{name} not shown in the open accordion"


def test_every_control_has_a_tooltip(browser):
    titles = {name: browser.execute_script("return gradioApp().querySelector(arguments[0]).title;", f"#{el_id(name)}")
              for name in ("enabled", "method", "preset", "alpha", "beta", "lambda", "start", "end", "single_pass",
                           "show_map")}
    empty = [n for n, t in titles.items() if not t or len(t) < 20]
    assert not empty, f"controls without a tooltip: {empty}"
    assert len(set(titles.values())) == len(titles), "two controls share one tooltip"
    assert "negative" in titles["alpha"].lower() and "negative" in titles["beta"].lower(), titles
    # A1111's own hint code (hints.js) reads its global `titles` table by label text
    host_table = browser.execute_script(
        "return [titles['Alpha (negative strength)'], titles['Single pass (replace CFG)']];")
    assert host_table == [titles["alpha"], titles["single_pass"]], host_table


@pytest.mark.parametrize("preset,method,alpha,beta", [("VSF Strong", "VSF", 3.8, 0.2), ("NAG", "NAG", 4.0, 0.125),
                                                     ("VSF Quality", "VSF", 3.3, 0.2)])
def test_preset_fills_the_sliders(browser, preset, method, alpha, beta):
    open_accordion(browser)
    choose(browser, "preset", preset)
    wait_for(browser, lambda d: (dropdown_value(d, "method"), slider_value(d, "alpha"), slider_value(d, "beta"))
             == (method, alpha, beta), 15,
             f"preset {preset} did not fill method/alpha/beta with {method}/{alpha}/{beta}: "
             f"{dropdown_value(browser, 'method')}/{slider_value(browser, 'alpha')}/{slider_value(browser, 'beta')}")


def test_paste_from_infotext(browser):
    keys = vsf_keys()
    text = ("a photo of a cat\nNegative prompt: dog, blurry\n"
            "Steps: 3, Sampler: Euler, Schedule type: Automatic, CFG scale: 1, Seed: 42, Size: 64x64, "
            f"{keys['method']}: nasa, {keys['alpha']}: 0.4, {keys['beta']}: 0.35, {keys['start']}: 0.25, "
            f"{keys['end']}: 0.75, VSF preset: Custom, VSF single pass: False")
    # start from a closed accordion with other values, so each control visibly changes
    open_accordion(browser)
    choose(browser, "preset", "VSF Strong")
    q(browser, f"#{el_id('enabled')} .label-wrap").click()
    wait_for(browser, lambda d: not enabled_state(d), 10, "accordion did not close")
    paste_infotext(browser, text)
    wait_for(browser, lambda d: enabled_state(d) and slider_value(d, "alpha") == 0.4, 30,
             f"paste did not enable VSF with alpha 0.4 (enabled {enabled_state(browser)}, "
             f"alpha {slider_value(browser, 'alpha')})")
    assert dropdown_value(browser, "method") == "NASA"
    assert dropdown_value(browser, "preset") == "Custom"
    assert (slider_value(browser, "beta"), slider_value(browser, "start"), slider_value(browser, "end")) == (0.35, 0.25, 0.75)
    single = browser.execute_script(f"return gradioApp().querySelector('#{el_id('single_pass')} input').checked;")
    assert single is False, "single pass not unticked by the paste"
    # an infotext without VSF keys turns the accordion off (as the host does for its own options)
    paste_infotext(browser, "a photo of a cat\nSteps: 3, Sampler: Euler, CFG scale: 1, Seed: 42, Size: 64x64")
    wait_for(browser, lambda d: not enabled_state(d), 30, "pasting an infotext without VSF left VSF on")


def test_negative_typed_at_cfg_1_reaches_the_generation(browser):
    # a small, fast image from pasted parameters (no VSF keys: the accordion goes off)
    paste_infotext(browser, "a photo of a cat\nSteps: 3, Sampler: Euler, CFG scale: 1, Seed: 42, Size: 64x64")
    wait_for(browser, lambda d: (slider_value_by_id(d, "txt2img_steps"), slider_value_by_id(d, "txt2img_width"),
                                 slider_value_by_id(d, "txt2img_cfg_scale")) == (3, 64, 1), 30,
             "pasted steps, size and CFG 1")
    wait_for(browser, lambda d: not enabled_state(d), 10, "the paste without VSF keys left VSF on")
    assert not q(browser, NEG).get_attribute("disabled"), "A1111 disabled the negative box at CFG 1"
    open_accordion(browser)
    choose(browser, "preset", "VSF Quality")
    box = q(browser, NEG)
    scroll_into_view(browser, box)
    box.click()
    box.clear()
    box.send_keys(TYPED_NEGATIVE)  # real key events, as a user types
    assert box.get_attribute("value") == TYPED_NEGATIVE
    shown = {name: slider_value(browser, name) for name in ("alpha", "beta", "start", "end")}
    q(browser, "#txt2img_generate").click()
    info = wait_for(browser, lambda d: d.execute_script(
        "const el = gradioApp().querySelector('#html_info_txt2img');"
        "return el && el.textContent.includes('VSF method') ? el.textContent : '';"),
        GENERATE_TIMEOUT, "the generated image's infotext")
    assert f"Negative prompt: {TYPED_NEGATIVE}" in info, info
    assert "VSF method: vsf" in info and "CFG scale: 1" in info, info
    assert_infotext_used(info, shown)  # what the sliders show is what the generation used


def test_server_log_has_no_extension_errors(ui_server):
    bad = extension_errors(ui_server.log_text())
    assert not bad, "extension errors in the server log:\n" + "\n---\n".join(b[:3000] for b in bad)
