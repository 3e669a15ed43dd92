"""The weights CLI (``python -m waifukit weights ...``) against a loopback HTTP server with Range support.

Only 127.0.0.1 servers started here are contacted; the built-in downloader is forced (``--no-hf-hub``) except
in the one test that exercises huggingface_hub against the same loopback server.
"""
from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from waifukit import weights
from waifukit.registry import FETCH_HINT, fetch_hint

REPO_ROOT = Path(__file__).resolve().parent.parent
REPO = "org/tiny"


def tiny_safetensors(n_floats: int = 300) -> bytes:
    """A valid safetensors file without torch: one fp32 tensor."""
    data = struct.pack(f"<{n_floats}f", *[i * 0.5 for i in range(n_floats)])
    header = json.dumps({"w": {"dtype": "F32", "shape": [n_floats], "data_offsets": [0, len(data)]}}).encode()
    return struct.pack("<Q", len(header)) + header + data


FILES = {
    "model_index.json": b'{"_class_name": "Tiny"}',
    "transformer/diffusion_pytorch_model.safetensors": tiny_safetensors(),
}


class LoopbackHF:
    """Serves ``/{repo}/resolve/{rev}/{path}`` from ``files``; logs every request; can drop a response after
    ``drop[path]`` bytes (once per entry) or serve ``corrupt[path]`` bytes instead of the real ones."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.drop: dict[str, int] = {}
        self.corrupt: dict[str, bytes] = {}
        self.redirect: dict[str, str] = {}
        self.log: list[tuple[str, str, dict]] = []
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep pytest output clean
                pass

            def _serve(self, head: bool):
                srv.log.append((self.command, self.path, dict(self.headers)))
                # /{repo}/resolve/{rev}/{path} (the HF layout) or /cdn/{path} (a redirect target)
                key = (self.path.split("/resolve/", 1)[1].split("/", 1)[1] if "/resolve/" in self.path
                       else self.path.removeprefix("/cdn/"))
                if key in srv.redirect:
                    self.send_response(302)
                    self.send_header("Location", srv.redirect[key])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = srv.corrupt.get(key, srv.files.get(key))
                if body is None:
                    self.send_error(404)
                    return
                etag = '"' + hashlib.sha256(body).hexdigest() + '"'
                start, status = 0, 200
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                self.send_response(status)
                self.send_header("Content-Length", str(len(body) - start))
                self.send_header("ETag", etag)
                self.send_header("X-Repo-Commit", "0" * 40)  # what huggingface_hub expects from HF
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                if head:
                    return
                payload = body[start:]
                cut = srv.drop.pop(key, None) if not head else None
                if cut is not None:
                    self.wfile.write(payload[:cut])  # then close: the client sees a short body
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(payload)

            def do_GET(self):
                self._serve(head=False)

            def do_HEAD(self):
                self._serve(head=True)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.timeout = 0.2
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        deadline = time.monotonic() + 120  # bounded: never outlives a test run
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.httpd.handle_request()

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self.httpd.server_close()

    def gets(self, path: str) -> list[dict]:
        return [h for m, p, h in self.log if m == "GET" and p.endswith("/" + path)]


@pytest.fixture
def server():
    s = LoopbackHF()
    s.files.update(FILES)
    yield s
    s.close()


def write_manifest(tmp_path: Path, files: dict[str, bytes], pin=True, extra_files=()) -> Path:
    entries = [{"path": p, "approx_bytes": len(b), "size": len(b) if pin else None,
                "sha256": hashlib.sha256(b).hexdigest() if pin else None} for p, b in files.items()]
    entries += list(extra_files)
    m = {"_about": "test", "models": {"tiny": {"hf_repo": REPO, "revision": None, "family": "waifu",
                                               "comfy_folder": "diffusers/tiny", "files": entries,
                                               "download": "n/a"}}}
    path = tmp_path / "manifest.json"
    path.write_text(weights.dump_manifest(m))
    return path


@pytest.fixture
def comfy(tmp_path):
    (tmp_path / "ComfyUI" / "models").mkdir(parents=True)
    return tmp_path / "ComfyUI"


def run(*argv) -> tuple[int, str]:
    lines: list[str] = []
    rc = weights.main(["weights", *map(str, argv)], out=lines.append)
    return rc, "\n".join(lines)


def status_count(out: str, status: str) -> int:
    return sum(line.split()[:1] == [status] for line in out.splitlines() if line.startswith("  "))


def fetch(server, manifest, comfy, *extra):
    return run("fetch", "tiny", "--manifest", manifest, "--comfyui", comfy, "--endpoint", server.url,
               "--no-hf-hub", "--backoff", "0", "--timeout", "5", *extra)


def dest(comfy: Path, rel: str) -> Path:
    return comfy / "models" / "diffusers" / "tiny" / rel


# ----------------------------------------------------------------------------------------------- tests

def test_list_shows_missing_then_present(server, tmp_path, comfy):
    manifest = write_manifest(tmp_path, FILES)
    rc, out = run("list", "--manifest", manifest, "--comfyui", comfy)
    assert rc == 0
    assert "tiny" in out and str((comfy / "models" / "diffusers" / "tiny").resolve()) in out
    assert status_count(out, "missing") == 2 and "0/2 present" in out
    rc, out = fetch(server, manifest, comfy)
    assert rc == 0, out
    rc, out = run("list", "--manifest", manifest, "--comfyui", comfy)
    assert status_count(out, "missing") == 0 and "2/2 present" in out and status_count(out, "ok") == 2


def test_fetch_places_files_and_skips_complete_ones(server, tmp_path, comfy):
    manifest = write_manifest(tmp_path, FILES)
    rc, out = fetch(server, manifest, comfy)
    assert rc == 0, out
    for rel, body in FILES.items():
        assert dest(comfy, rel).read_bytes() == body
        assert not weights.part_path(dest(comfy, rel)).exists()
    # The URL layout is Hugging Face's resolve URL at the default revision.
    assert any(p == f"/{REPO}/resolve/main/model_index.json" for _, p, _ in server.log)
    n = len(server.log)
    rc, out = fetch(server, manifest, comfy)
    assert rc == 0 and out.count("already complete") == 2 and len(server.log) == n  # no network at all


def test_interrupted_download_resumes_with_range(server, tmp_path, comfy):
    rel = "transformer/diffusion_pytorch_model.safetensors"
    manifest = write_manifest(tmp_path, FILES)
    server.drop[rel] = 500
    rc, out = fetch(server, manifest, comfy)
    assert rc == 0, out
    gets = server.gets(rel)
    assert len(gets) == 2 and "Range" not in gets[0] and gets[1]["Range"] == "bytes=500-"
    assert dest(comfy, rel).read_bytes() == FILES[rel]


def test_part_file_is_kept_between_runs_and_resumed(server, tmp_path, comfy):
    rel = "transformer/diffusion_pytorch_model.safetensors"
    manifest = write_manifest(tmp_path, FILES)
    server.drop[rel] = 700
    rc, out = fetch(server, manifest, comfy, "--retries", "0")  # give up at once: the run fails
    assert rc == 1 and "run fetch again to resume" in out
    part = weights.part_path(dest(comfy, rel))
    assert part.stat().st_size == 700 and not dest(comfy, rel).exists()
    rc, out = run("verify", "tiny", "--manifest", manifest, "--comfyui", comfy)
    assert rc == 1 and "partial download" in out
    rc, out = fetch(server, manifest, comfy)  # a new process would do the same: state is the .part file
    assert rc == 0, out
    assert server.gets(rel)[-1]["Range"] == "bytes=700-"
    assert dest(comfy, rel).read_bytes() == FILES[rel] and not part.exists()


def test_corrupted_download_is_detected_and_never_placed(server, tmp_path, comfy):
    rel = "transformer/diffusion_pytorch_model.safetensors"
    manifest = write_manifest(tmp_path, FILES)
    bad = bytearray(FILES[rel])
    bad[-1] ^= 0xFF  # same size, still a well-formed safetensors file: only the hash can tell
    server.corrupt[rel] = bytes(bad)
    rc, out = fetch(server, manifest, comfy)
    assert rc == 1 and "sha256 mismatch" in out and "nothing was placed" in out
    assert not dest(comfy, rel).exists() and not weights.part_path(dest(comfy, rel)).exists()
    assert dest(comfy, "model_index.json").is_file()  # the good file still arrived
    # A server with a different size is refused before the body is kept.
    server.corrupt[rel] = FILES[rel] + b"extra"
    rc, out = fetch(server, manifest, comfy)
    assert rc == 1 and "manifest says" in out
    assert not dest(comfy, rel).exists() and not weights.part_path(dest(comfy, rel)).exists()


def test_unpinned_truncated_safetensors_is_caught_by_the_format_check(server, tmp_path, comfy):
    rel = "transformer/diffusion_pytorch_model.safetensors"
    manifest = write_manifest(tmp_path, FILES, pin=False)  # the real manifest's state: nothing pinned yet
    server.corrupt[rel] = FILES[rel][:-40]
    rc, out = fetch(server, manifest, comfy)
    assert rc == 1 and "truncated" in out
    assert not dest(comfy, rel).exists() and not weights.part_path(dest(comfy, rel)).exists()


def test_pickle_weights_refused_without_allow_pickle(server, tmp_path, comfy):
    server.files["weights.pth"] = b"\x80\x04not really a pickle"
    manifest = write_manifest(tmp_path, {**FILES, "weights.pth": server.files["weights.pth"]})
    rc, out = fetch(server, manifest, comfy)
    assert rc == 1 and "refusing pickle" in out and "--allow-pickle" in out
    assert server.log == [] and not (comfy / "models" / "diffusers").exists()  # nothing downloaded at all
    rc, out = fetch(server, manifest, comfy, "--allow-pickle")
    assert rc == 0, out
    assert dest(comfy, "weights.pth").read_bytes() == server.files["weights.pth"]


def test_verify_detects_truncated_and_tampered_files(server, tmp_path, comfy):
    rel = "transformer/diffusion_pytorch_model.safetensors"
    manifest = write_manifest(tmp_path, FILES)
    assert fetch(server, manifest, comfy)[0] == 0
    rc, out = run("verify", "--manifest", manifest, "--comfyui", comfy)
    assert rc == 0 and "FAIL" not in out
    path = dest(comfy, rel)
    path.write_bytes(FILES[rel][:-10])
    rc, out = run("verify", "tiny", "--manifest", manifest, "--comfyui", comfy)
    assert rc == 1 and "wrong size" in out and rel in out
    bad = bytearray(FILES[rel])
    bad[-1] ^= 1
    path.write_bytes(bytes(bad))
    rc, out = run("verify", "--manifest", manifest, "--comfyui", comfy)
    assert rc == 1 and "sha256 mismatch" in out
    # fetch repairs it: the bad file is replaced by a verified download.
    rc, out = fetch(server, manifest, comfy)
    assert rc == 0 and "redo" in out and path.read_bytes() == FILES[rel]


def test_verify_record_pins_null_sizes_and_hashes(server, tmp_path, comfy):
    manifest = write_manifest(tmp_path, FILES, pin=False)
    assert fetch(server, manifest, comfy)[0] == 0
    before = manifest.read_text()
    rc, out = run("verify", "--manifest", manifest, "--comfyui", comfy)
    assert rc == 0 and "nothing pinned" in out and manifest.read_text() == before  # no --record: untouched
    rc, out = run("verify", "--record", "--manifest", manifest, "--comfyui", comfy)
    assert rc == 0 and "recorded 4 value(s)" in out
    files = {f["path"]: f for f in json.loads(manifest.read_text())["models"]["tiny"]["files"]}
    for rel, body in FILES.items():
        assert files[rel]["size"] == len(body) and files[rel]["sha256"] == hashlib.sha256(body).hexdigest()
    # Layout kept: one line per file entry, other fields untouched.
    assert sum('"path": ' in line for line in manifest.read_text().splitlines()) == len(FILES)
    assert json.loads(manifest.read_text())["_about"] == "test"
    # Now pinned, tampering is caught.
    dest(comfy, "model_index.json").write_bytes(b'{"_class_name": "Tinx"}')
    rc, out = run("verify", "--manifest", manifest, "--comfyui", comfy)
    assert rc == 1 and "sha256 mismatch" in out


def test_works_without_huggingface_hub(server, tmp_path, comfy, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import now raises ImportError
    assert not weights.have_hf_hub()
    manifest = write_manifest(tmp_path, FILES)
    rc, out = run("fetch", "tiny", "--manifest", manifest, "--comfyui", comfy, "--endpoint", server.url,
                  "--backoff", "0")
    assert rc == 0 and "built-in HTTPS" in out
    assert dest(comfy, "model_index.json").read_bytes() == FILES["model_index.json"]


def test_token_is_not_forwarded_across_redirects(server, tmp_path, comfy, monkeypatch):
    cdn = LoopbackHF()  # a second loopback server on another port stands in for the CDN
    try:
        rel = "transformer/diffusion_pytorch_model.safetensors"
        cdn.files[rel] = FILES[rel]
        server.redirect[rel] = f"{cdn.url}/cdn/{rel}"
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        rc, out = fetch(server, write_manifest(tmp_path, FILES), comfy)
        assert rc == 0, out
        assert server.gets(rel)[0]["Authorization"] == "Bearer hf_test_token"
        assert cdn.gets(rel) and "Authorization" not in cdn.gets(rel)[0]
        assert dest(comfy, rel).read_bytes() == FILES[rel]
    finally:
        cdn.close()


def test_unknown_model_and_missing_comfyui_are_clear_errors(server, tmp_path, comfy):
    manifest = write_manifest(tmp_path, FILES)
    rc, out = run("fetch", "nope", "--manifest", manifest, "--comfyui", comfy, "--no-hf-hub")
    assert rc == 2 and "unknown model nope" in out and "tiny" in out
    rc, out = run("fetch", "tiny", "--manifest", manifest, "--comfyui", tmp_path / "typo", "--no-hf-hub")
    assert rc == 2 and "--comfyui" in out and not (tmp_path / "typo").exists()
    assert server.log == []


def test_manifest_paths_cannot_escape_models_folder(tmp_path, comfy):
    manifest = write_manifest(tmp_path, {}, extra_files=[{"path": "../../evil.safetensors", "approx_bytes": 1,
                                                          "size": None, "sha256": None}])
    rc, out = run("list", "--manifest", manifest, "--comfyui", comfy)
    assert rc == 2 and "without '..'" in out


def test_real_manifest_loads_and_keeps_its_layout():
    data = weights.load_manifest(weights.DEFAULT_MANIFEST)
    assert "waifu-2b" in data["models"]
    assert json.loads(weights.dump_manifest(data)) == data
    for model in data["models"].values():
        assert all(not weights.is_pickle(f) for f in model["files"]), "ship safetensors, not pickles"


def test_loader_errors_name_the_cli_line(tmp_path):
    assert "python -m waifukit weights fetch waifu-2b --comfyui /path/to/ComfyUI" in FETCH_HINT
    assert "huggingface-cli download AiArtLab/waifu-2b --local-dir ComfyUI/models/diffusers/waifu-2b" in FETCH_HINT
    assert "weights fetch other-model --comfyui" in fetch_hint("other-model")
    from waifukit.loading import CheckpointError, resolve_linear_dit
    with pytest.raises(CheckpointError, match="python -m waifukit weights fetch waifu-2b"):
        resolve_linear_dit(tmp_path / "missing.safetensors")


def test_module_entry_point_subprocess(tmp_path, comfy):
    manifest = write_manifest(tmp_path, FILES)
    proc = subprocess.run([sys.executable, "-m", "waifukit", "weights", "list", "--manifest", str(manifest),
                           "--comfyui", str(comfy)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert status_count(proc.stdout, "missing") == 2 and "0/2 present" in proc.stdout


def test_huggingface_hub_path_against_loopback(server, tmp_path, comfy):
    pytest.importorskip("huggingface_hub")
    manifest = write_manifest(tmp_path, FILES)
    rc, out = run("fetch", "tiny", "--manifest", manifest, "--comfyui", comfy, "--endpoint", server.url)
    assert rc == 0, out
    assert "huggingface_hub" in out
    for rel, body in FILES.items():
        assert dest(comfy, rel).read_bytes() == body
    assert not (comfy / "models" / ".waifu-download").exists()  # staging cleaned up


def test_huggingface_hub_path_honours_retries_backoff_and_timeout(tmp_path, comfy, monkeypatch):
    """--retries/--backoff/--timeout reach the huggingface_hub path: hf_hub_download (faked, no network) fails
    twice and then succeeds; each call sees the --timeout as its read timeout and etag_timeout; waits follow
    http_download's rule; huggingface_hub's own setting is restored afterwards."""
    hf = pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants
    before = constants.HF_HUB_DOWNLOAD_TIMEOUT, constants.HF_HUB_ETAG_TIMEOUT
    calls, sleeps = [], []

    def fake_download(repo_id, filename, *, revision=None, local_dir=None, endpoint=None, etag_timeout=None, **kw):
        calls.append((constants.HF_HUB_DOWNLOAD_TIMEOUT, constants.HF_HUB_ETAG_TIMEOUT, etag_timeout))
        if len(calls) <= 2:
            raise hf.errors.LocalEntryNotFoundError("connection reset by peer")  # what a dropped Hub looks like
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(FILES[filename])
        return str(path)

    monkeypatch.setattr(hf, "hf_hub_download", fake_download)
    monkeypatch.setattr(weights.time, "sleep", sleeps.append)
    manifest = write_manifest(tmp_path, {"model_index.json": FILES["model_index.json"]})
    rc, out = run("fetch", "tiny", "--manifest", manifest, "--comfyui", comfy, "--retries", "2", "--timeout", "7",
                  "--backoff", "3")
    assert rc == 0, out
    assert calls == [(7, 7, 7)] * 3
    assert sleeps == [3, 6]  # backoff, doubled while attempts bring nothing (as http_download)
    assert out.count("interrupted (LocalEntryNotFoundError: connection reset by peer); retrying") == 2
    assert dest(comfy, "model_index.json").read_bytes() == FILES["model_index.json"]
    assert (constants.HF_HUB_DOWNLOAD_TIMEOUT, constants.HF_HUB_ETAG_TIMEOUT) == before

    # One retry fewer than needed: the file fails after retries + 1 attempts, nothing is placed.
    calls.clear()
    dest(comfy, "model_index.json").unlink()
    rc, out = run("fetch", "tiny", "--manifest", manifest, "--comfyui", comfy, "--retries", "1", "--backoff", "0")
    assert rc == 1 and len(calls) == 2 and "failed after 2 attempts" in out
    assert not dest(comfy, "model_index.json").exists()


def test_huggingface_hub_path_does_not_retry_a_missing_file(server, tmp_path, comfy, monkeypatch):
    """A 404 from the Hub (wrong file name or revision) fails the same way every time: no retries."""
    pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(weights.time, "sleep", lambda s: pytest.fail("retried a 404"))
    manifest = write_manifest(tmp_path, {"no/such/file.json": b"{}"})
    rc, out = run("fetch", "tiny", "--manifest", manifest, "--comfyui", comfy, "--endpoint", server.url,
                  "--timeout", "5")
    assert rc == 1 and "huggingface_hub download failed:" in out and "attempts" not in out
    assert "retrying" not in out
    assert len([1 for m, p, _ in server.log if p.endswith("/no/such/file.json")]) == 1
