"""Headless Chromium for the browser e2e tests (opt-in; never run in CI): finding the binaries, one
driver per test module with a fresh profile, and polling the page while gradio renders.

`VSF_CHROMIUM` / `VSF_CHROMEDRIVER` override the binaries (default: `chromium` / `chromedriver` on PATH,
Debian's packages of those names).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time

CHROMIUM = os.environ.get("VSF_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser") or ""
CHROMEDRIVER = os.environ.get("VSF_CHROMEDRIVER") or shutil.which("chromedriver") or ""
# A machine with no network: no background fetches; a fresh profile is added per driver.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def have_chromium() -> bool:
    return bool(CHROMIUM and CHROMEDRIVER and os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER))


@contextlib.contextmanager
def chromium_driver(extra_flags: list[str], page_load_timeout: float, screenshot: str | None = None):
    """A selenium Chrome driver on headless Chromium with a fresh profile; quit (after saving
    `screenshot`, when given) and the profile removed on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="vsf-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + list(extra_flags) + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(page_load_timeout)
        yield driver
    finally:
        try:
            if screenshot:
                os.makedirs(os.path.dirname(screenshot), exist_ok=True)
                driver.save_screenshot(screenshot)
        finally:
            driver.quit()
            shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver, condition, timeout: float, what: str):
    """Poll `condition(driver)` until it is truthy (returned) or `timeout` seconds pass (AssertionError
    naming `what` and the last error); errors while gradio rebuilds the page count as "not yet"."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = condition(driver)
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - the DOM changes under us while gradio renders
            last_error = e
        time.sleep(0.3)
    raise AssertionError(f"{what} (after {timeout:.0f}s; last error: {last_error!r})")
