"""The live-server harness (webui_server.py) against a stand-in `launch.py`: a plain HTTP server that answers
the two API routes the harness needs. Runs in CI (about a second): start on the chosen port, the extension
link while running and gone afterwards, requests merged over the base request, the log file, stop."""
from __future__ import annotations

import os
import sys
import textwrap

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import webui_server  # noqa: E402

FAKE_LAUNCH = textwrap.dedent('''
    import json, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    port = int(sys.argv[sys.argv.index("--port") + 1])
    print("fake host starting on", port, flush=True)
    class H(BaseHTTPRequestHandler):
        def _send(self, code, obj):
            raw = json.dumps(obj).encode()
            self.send_response(code); self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw))); self.end_headers(); self.wfile.write(raw)
        def do_GET(self):
            self._send(200 if self.path == "/sdapi/v1/sd-models" else 404, [])
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"null")
            if self.path == "/sdapi/v1/txt2img" and body.get("seed") == -7:
                self._send(422, {"detail": "bad seed"})
            else:
                self._send(200, {"images": ["x"], "echo": body, "path": self.path})
    HTTPServer(("127.0.0.1", port), H).serve_forever()
''')


def test_harness_starts_links_requests_and_stops(tmp_path, monkeypatch):
    host = tmp_path / "host"
    host.mkdir()
    (host / "launch.py").write_text(FAKE_LAUNCH)
    port = webui_server.free_port()
    monkeypatch.setenv("VSF_E2E_PORT", str(port))
    monkeypatch.setenv("VSF_E2E_LOG_DIR", str(tmp_path / "logs"))
    server = webui_server.WebUIServer("fake", str(host), sys.executable, ["--api"],
                                      base_request={"prompt": "p", "seed": 1}, startup_timeout=30)
    link = host / "extensions" / webui_server.EXT_LINK_NAME
    assert server.port == port and server.log_path == str(tmp_path / "logs" / "fake-server.log")
    with webui_server.running(server):
        assert os.path.realpath(link) == os.path.realpath(webui_server.REPO)
        data = server.txt2img_ok("merged", seed=5)
        assert data["echo"] == {"prompt": "p", "seed": 5} and data["path"] == "/sdapi/v1/txt2img"
        data = server.img2img_ok("img2img", "b64")
        assert data["echo"]["init_images"] == ["b64"] and data["path"] == "/sdapi/v1/img2img"
        status, data = server.txt2img("refused", seed=-7)
        assert (status, data) == (422, {"detail": "bad seed"})
        with pytest.raises(AssertionError, match="HTTP 422"):
            server.txt2img_ok("refused", seed=-7)
        proc = server.proc
    assert proc.poll() is not None, "server still running after stop"
    assert not os.path.lexists(link), "extension link left behind"
    assert "fake host starting on" in server.log_text()
    assert [t[0] for t in server.timings][0] == "startup (launch to API ready)"


def test_harness_reports_a_host_that_dies_at_startup(tmp_path, monkeypatch):
    host = tmp_path / "host"
    host.mkdir()
    (host / "launch.py").write_text("import sys; print('no model found', flush=True); sys.exit(3)\n")
    monkeypatch.setenv("VSF_E2E_LOG_DIR", str(tmp_path))
    server = webui_server.WebUIServer("dying", str(host), sys.executable, [], startup_timeout=30)
    with pytest.raises(webui_server.ServerError, match=r"exited with 3(.|\n)*no model found"):
        with webui_server.running(server):
            pass
    assert not os.path.lexists(host / "extensions" / webui_server.EXT_LINK_NAME)


def test_harness_links_the_extension_dir_it_is_given(tmp_path, monkeypatch):
    other = tmp_path / "candidate"
    other.mkdir()
    host = tmp_path / "host"
    monkeypatch.setenv("VSF_E2E_EXTENSION_DIR", str(other))
    link = webui_server.link_extension(str(host))
    assert os.path.realpath(link) == os.path.realpath(other)
    monkeypatch.delenv("VSF_E2E_EXTENSION_DIR")
    with pytest.raises(RuntimeError, match="links somewhere else"):
        webui_server.link_extension(str(host))  # never replaces a link to another checkout
    os.unlink(link)


def test_extra_images_are_the_images_after_those_with_an_infotext():
    import json

    with_grid = {"images": ["grid", "a", "b", "map a", "map b"], "info": json.dumps({"infotexts": ["g", "a", "b"]})}
    assert webui_server.extra_images(with_grid) == ["map a", "map b"]
    plain = {"images": ["a"], "info": json.dumps({"infotexts": ["a"]})}
    assert webui_server.extra_images(plain) == []
