"""Live-server harness shared by the opt-in end-to-end tests (Forge, AUTOMATIC1111, Forge Neo).

Owns: starting a host's `launch.py` on 127.0.0.1 (free port, or the one in VSF_E2E_PORT) with this repository
symlinked as `<host>/extensions/sd-webui-vsf`, waiting for the API with a bounded timeout, the HTTP helpers the
tests use (txt2img, img2img, png-info, interrupt, script-info), infotext parsing, the server log (a known
file, see `log_path_for`), and stopping the server and removing the link afterwards. Nothing here imports a
host module: the tests talk to the server over HTTP only.

Environment knobs (all optional):
    VSF_E2E_PORT              port to listen on (default: a free one)
    VSF_E2E_LOG_DIR           folder for the server log (default: <system temp>/vsf-e2e); the log is
                              `<name>-server.log` there, rewritten at each start and kept afterwards
    VSF_E2E_STARTUP_TIMEOUT   seconds to wait for the API (default 300)
    VSF_E2E_REQUEST_TIMEOUT   seconds per request (default 300)
    VSF_E2E_KEEP_LOG=1        print the log tail when the server stops
    VSF_E2E_EXTENSION_DIR     the extension checkout to link (default: this repository), e.g. a merge
                              candidate checked out elsewhere, tested with this checkout's tests
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
HOST = "127.0.0.1"
EXT_LINK_NAME = "sd-webui-vsf"
SCRIPT_TITLE = "Value Sign Flip"

# Offline and quiet: no hub, no analytics; unbuffered so the log shows where a hang is.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "DO_NOT_TRACK": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    return float(value) if value else default


# Direct connections only (a user's http_proxy must not see loopback requests).
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def chosen_port() -> int:
    """VSF_E2E_PORT when set (a fixed port for a firewall or a browser by hand), else a free one."""
    value = os.environ.get("VSF_E2E_PORT", "")
    return int(value) if value else free_port()


def log_path_for(name: str) -> str:
    folder = os.environ.get("VSF_E2E_LOG_DIR") or os.path.join(tempfile.gettempdir(), "vsf-e2e")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{name}-server.log")


def tail(path: str, n: int = 80) -> str:
    try:
        with open(path, "r", errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return "<no log>"


def decode_image(b64: str):
    """A base64 PNG from the API as an HxWx3 uint8 array."""
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def encode_image(pixels) -> str:
    """An HxWx3 uint8 array as the base64 PNG the API's init_images take."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def infotexts(data: dict) -> list[str]:
    return json.loads(data["info"])["infotexts"]


def extra_images(data: dict) -> list[str]:
    """The API's `images` after those with an infotext (grid and outputs): `processed.extra_images`, where
    the extension's "Show where the negative acts" maps go (one per output, only when asked for)."""
    return data["images"][len(infotexts(data)):]


def params_line(text: str) -> str:
    return text.strip().split("\n")[-1]


def infotext_value(text: str, key: str) -> str | None:
    m = re.search(r"(?:^|, )" + re.escape(key) + r': ("(?:\\.|[^"])*"|[^,]*)', params_line(text))
    return m.group(1).strip() if m else None


def assert_infotext_used(info: str, shown: dict) -> None:
    """Each VSF control's value as the UI showed it ({"alpha": 3.3, ...}) is the one the image's infotext
    (a page's generation-info text) records: `VSF <name>: <value>`."""
    import pytest

    for name, value in shown.items():
        key = f"VSF {name}: "
        assert key in info, info
        used = float(info.split(key, 1)[1].split(",", 1)[0])
        assert used == pytest.approx(value), f"slider {name} shows {value}, the image used {used}: {info}"


def vsf_keys() -> dict:
    import sys

    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from lib_vsf.settings import INFOTEXT_KEYS

    return INFOTEXT_KEYS


def extension_source() -> str:
    return os.path.abspath(os.environ.get("VSF_E2E_EXTENSION_DIR") or REPO)


def link_extension(host_dir: str) -> str:
    """Symlink the extension (this repository unless VSF_E2E_EXTENSION_DIR) as <host>/extensions/sd-webui-vsf;
    a stale link to it is recreated."""
    source = extension_source()
    link = os.path.join(host_dir, "extensions", EXT_LINK_NAME)
    if os.path.islink(link):
        if os.path.realpath(link) != os.path.realpath(source):
            raise RuntimeError(f"{link} links somewhere else ({os.readlink(link)}); remove it first")
        os.unlink(link)
    elif os.path.exists(link):
        raise RuntimeError(f"{link} exists and is not a symlink to this repository; move it away first")
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink(source, link)
    return link


class ServerError(RuntimeError):
    """The server exited or never became ready; the message carries the log tail."""


class WebUIServer:
    """One host server process: start/stop, request helpers, per-request timings.

    `base_request` is merged under every txt2img/img2img body. `ready_path` is polled with GET until 200.
    """

    def __init__(self, name: str, host_dir: str, python: str, launch_args: list[str], *,
                 base_request: dict | None = None, ready_path: str = "/sdapi/v1/sd-models",
                 env: dict | None = None, port: int | None = None, log_path: str | None = None,
                 startup_timeout: float | None = None, request_timeout: float | None = None):
        self.name = name
        self.host_dir = os.path.abspath(host_dir)
        self.python = python
        self.launch_args = list(launch_args)
        self.base_request = dict(base_request or {})
        self.ready_path = ready_path
        self.extra_env = dict(env or {})
        self.port = port if port is not None else chosen_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = log_path or log_path_for(name)
        self.startup_timeout = startup_timeout or env_float("VSF_E2E_STARTUP_TIMEOUT", 300.0)
        self.request_timeout = request_timeout or env_float("VSF_E2E_REQUEST_TIMEOUT", 300.0)
        self.proc: subprocess.Popen | None = None
        self.link: str | None = None
        self.timings: list[tuple[str, float, int]] = []
        self._log = None
        self._lock = threading.Lock()

    # ---- life cycle ------------------------------------------------------------------------------

    def start(self) -> "WebUIServer":
        cmd = [self.python, "launch.py", *self.launch_args, "--server-name", HOST, "--port", str(self.port)]
        env = dict(os.environ, **OFFLINE_ENV, **self.extra_env)
        for var in ("VSF_FORGE_DIR", "VSF_A1111_DIR", "VSF_NEO_DIR", "VSF_REFORGE_DIR"):
            env.pop(var, None)  # the extension's own tests read these; the host must not
        self.link = link_extension(self.host_dir)
        self._log = open(self.log_path, "wb")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=self.host_dir, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"{self.name} exited with {self.proc.returncode} during startup "
                                  f"(log {self.log_path}):\n{tail(self.log_path)}")
            if time.monotonic() - t0 > self.startup_timeout:
                raise ServerError(f"{self.name} not ready after {self.startup_timeout:.0f}s "
                                  f"(log {self.log_path}):\n{tail(self.log_path)}")
            try:
                status, _ = self.request("GET", self.ready_path, label="startup poll", timeout=5)
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, socket.timeout, OSError):
                pass
            time.sleep(1.0)
        self.timings = [("startup (launch to API ready)", time.monotonic() - t0, 200)]
        return self

    def stop(self):
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
            except ProcessLookupError:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.link and os.path.islink(self.link):
            os.unlink(self.link)
        self.link = None

    def report(self) -> str:
        rows = "\n".join(f"  {label:<60} {secs:7.2f}s  HTTP {status}" for label, secs, status in self.timings)
        text = f"\n[{self.name} e2e] {self.url}, log {self.log_path}\n{rows}"
        if os.environ.get("VSF_E2E_KEEP_LOG"):
            text += "\n" + tail(self.log_path, 400)
        return text

    def log_text(self) -> str:
        with open(self.log_path, "r", errors="replace") as f:
            return f.read()

    # ---- HTTP ------------------------------------------------------------------------------------

    def request(self, method: str, path: str, body=None, label: str = "", timeout: float | None = None):
        """(status, parsed JSON or text); HTTP errors are returned, not raised."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        t0 = time.monotonic()
        try:
            with _OPENER.open(req, timeout=timeout or self.request_timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        with self._lock:
            self.timings.append((label or f"{method} {path}", time.monotonic() - t0, status))
        try:
            return status, json.loads(raw or b"null")
        except ValueError:
            return status, raw.decode(errors="replace")

    def _ok(self, label: str, status, data) -> dict:
        assert status == 200, f"{label}: HTTP {status}: {data}\n--- server log tail ---\n{tail(self.log_path)}"
        assert isinstance(data, dict) and data.get("images"), f"{label}: no images in response: {data}"
        return data

    def txt2img(self, label: str, **extra):
        return self.request("POST", "/sdapi/v1/txt2img", dict(self.base_request, **extra), label=label)

    def txt2img_ok(self, label: str, **extra) -> dict:
        return self._ok(label, *self.txt2img(label, **extra))

    def img2img(self, label: str, init_image: str, **extra):
        """`init_image`: base64 PNG (e.g. an earlier response's image)."""
        body = dict(self.base_request, init_images=[init_image], **extra)
        return self.request("POST", "/sdapi/v1/img2img", body, label=label)

    def img2img_ok(self, label: str, init_image: str, **extra) -> dict:
        return self._ok(label, *self.img2img(label, init_image, **extra))

    def png_info(self, image_b64: str, label: str = "POST png-info") -> dict:
        status, data = self.request("POST", "/sdapi/v1/png-info", {"image": image_b64}, label=label)
        assert status == 200, f"png-info: HTTP {status}: {data}"
        return data

    def interrupt(self, label: str = "POST interrupt"):
        return self.request("POST", "/sdapi/v1/interrupt", label=label, timeout=30)

    def progress(self) -> dict:
        status, data = self.request("GET", "/sdapi/v1/progress?skip_current_image=true", label="GET progress",
                                    timeout=30)
        assert status == 200, data
        return data

    def script_info(self, name: str, img2img: bool = False) -> dict:
        status, info = self.request("GET", "/sdapi/v1/script-info", label="GET script-info")
        assert status == 200, info
        for entry in info:
            if entry["name"] == name.lower() and bool(entry["is_img2img"]) == img2img:
                return entry
        raise AssertionError(f"script {name!r} not in /sdapi/v1/script-info ({'img2img' if img2img else 'txt2img'}): "
                             f"{sorted({e['name'] for e in info})}")


    def vsf_positional(self, values: dict, img2img: bool = False) -> list:
        """The extension's positional API list: the UI defaults from /sdapi/v1/script-info, slot 0 (the
        enable checkbox) on, and each `label prefix -> value` of `values` put into the one argument whose
        label starts with it (e.g. {"method": "VSF", "alpha": 3.3})."""
        entry = self.script_info(SCRIPT_TITLE, img2img=img2img)
        assert entry["is_alwayson"], entry
        args = [a["value"] for a in entry["args"]]
        labels = [(a["label"] or "").lower() for a in entry["args"]]
        assert isinstance(args[0], bool), f"slot 0 should be the enable checkbox: {entry['args'][0]}"
        args[0] = True
        for word, value in values.items():
            hits = [i for i, label in enumerate(labels) if label.startswith(word)]
            assert len(hits) == 1, f"no single argument labelled {word!r}: {labels}"
            args[hits[0]] = value
        return args

@contextlib.contextmanager
def running(server: WebUIServer, fail=None):
    """Start, yield, always stop (and unlink), then print the timings table. `fail` (e.g. `pytest.fail`)
    turns a server that does not start into that call with the reason, instead of the exception."""
    try:
        try:
            server.start()
        except (ServerError, RuntimeError) as e:
            if fail is None:
                raise
            fail(str(e))
        yield server
    finally:
        server.stop()
        print(server.report())


# --------------------------------------------------------------------------------------------------
# the server log

EXTENSION_MARKERS = re.compile(r"lib_vsf|sd-webui-vsf|scripts/vsf\.py|value sign flip|\[VSF\]|VSFSettingsError", re.I)
KNOWN_HOST_NOISE = "Failed reading extension data from Git repository"  # symlinked checkout has no `origin`


def extension_errors(log_text: str) -> list[str]:
    """Error reports (`*** ...` blocks, tracebacks) in a host log that involve the extension."""
    lines = log_text.splitlines()
    segments, i = [], 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("*** ") or "Traceback (most recent call last)" in line:
            seg = [lines[i - 1]] if i and not line.startswith("*** ") else []
            seg.append(line)
            i += 1
            while i < len(lines) and (lines[i].startswith((" ", "\t")) or lines[i] == ""):
                seg.append(lines[i])
                i += 1
            if i < len(lines) and not lines[i].startswith("*** "):
                seg.append(lines[i])  # the exception line of an unindented traceback
            segments.append("\n".join(seg))
            continue
        i += 1
    return [s for s in segments if EXTENSION_MARKERS.search(s) and KNOWN_HOST_NOISE not in s]
