"""install.py and javascript/: every control has a tooltip, and the install check fetches nothing."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess

import pytest

from lib_vsf.webui import ui
from lib_vsf.webui.args import UI_ARGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JS = os.path.join(ROOT, "javascript", "vsf_tooltips.js")


def js_source():
    with open(JS, encoding="utf-8") as f:
        return f.read()


def test_every_control_has_a_tooltip_keyed_by_its_elem_id():
    tips = re.search(r"const VSF_TIPS = \{(.*?)\n    \};", js_source(), re.S).group(1)
    keys = re.findall(r"^\s*(\w+):", tips, re.M)
    assert sorted(keys) == sorted(UI_ARGS)
    assert "`#vsf_${tab}_${name}`" in js_source()
    assert ui.elem_id("alpha", False) == "vsf_txt2img_alpha" and ui.elem_id("end", True) == "vsf_img2img_end"


def test_unique_labels_in_the_titles_table_are_the_ui_labels():
    labels = set(re.findall(r'^\s*"([^"]+)": VSF_TIPS\.', js_source(), re.M))
    assert labels == {ui.TITLE, *(ui.LABELS[k] for k in ("alpha", "beta", "lambda", "start", "end", "single_pass",
                                                        "show_map", "negative_image"))}


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_tooltips_script_runs_in_a_page_like_global_scope():
    code = ("global.titles = {}; const seen = {}; "
            "global.gradioApp = () => ({querySelector: (s) => (seen[s] = {title: '', querySelectorAll: () => []})}); "
            "global.onUiLoaded = (f) => f(); "
            f"require({JS!r}); "
            "console.log(Object.keys(titles).length + ' ' + Object.keys(seen).length);")
    out = subprocess.run(["node", "-e", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["9", str(2 * len(UI_ARGS))]


def test_install_check_reports_torch_and_installs_nothing():
    spec = importlib.util.spec_from_file_location("vsf_install", os.path.join(ROOT, "install.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    usable, message = module.torch_report()
    assert usable and message.startswith("[VSF] torch ")
    source = open(os.path.join(ROOT, "install.py"), encoding="utf-8").read()
    assert "run_pip" not in source and "pip install" not in source
