"""Start a real ComfyUI server with this pack in custom_nodes, and talk to it over HTTP.

Used by the integration tests and by `make demo`. The server runs `main.py --cpu` on 127.0.0.1 with a
free port, a private base directory (models/, input/, output/, temp/, user/, custom_nodes/) and an
in-memory database, so nothing is written into the ComfyUI folder itself.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACK_DIR_NAME = "comfyui-waifu"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from setup_comfyui import Host, primary_host  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyHost:
    def __init__(self, base_dir: Path, host: Host | None = None, extra_args=(), env: dict | None = None):
        self.base = Path(base_dir)
        self.host = host or primary_host()
        self.comfyui = self.host.path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})  # e.g. PYTHONPATH for a sitecustomize; the host's own paths go first
        self.proc = None
        self.log_path = self.base / "server.log"

    @property
    def models(self) -> Path:
        return self.base / "models"

    @property
    def output(self) -> Path:
        return self.base / "output"

    def start(self, timeout: float = 180.0) -> "ComfyHost":
        for sub in ("custom_nodes", "models/diffusers", "models/diffusion_models", "models/text_encoders",
                    "models/vae", "input", "output", "temp", "user"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / PACK_DIR_NAME
        if not link.exists():
            link.symlink_to(ROOT, target_is_directory=True)
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", str(self.base),
               "--database-url", "sqlite:///:memory:", *self.extra_args]
        env = dict(self.host.env(dict(os.environ, **self.extra_env)), PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.comfyui, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout}s:\n{self.log_tail()}")

    def stop(self):
        # SIGINT is ignored by a background child of a non-interactive shell; TERM works at once.
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # --- HTTP ---
    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, payload) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                body = r.read()
                return r.status, (json.loads(body) if body else {})
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body)
            except ValueError:
                return e.code, {"raw": body.decode(errors="replace")}

    def queue(self, prompt: dict, client_id: str | None = None) -> tuple[int, dict]:
        return self.post("/prompt", {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            entry = hist.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"].get("completed") or entry["status"].get("status_str") == "error"):
                return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        """Queue an API-format workflow and return its /history entry (raises on HTTP rejection)."""
        code, body = self.queue(prompt)
        if code != 200:
            raise RuntimeError(f"/prompt answered {code}: {json.dumps(body)[:2000]}")
        return self.wait(body["prompt_id"], timeout)

    def output_images(self, entry: dict) -> list[Path]:
        paths = []
        for out in entry.get("outputs", {}).values():
            for img in out.get("images", []):
                folder = self.output / img.get("subfolder", "")
                paths.append(folder / img["filename"])
        return paths


def error_message(entry: dict) -> str:
    """The exception message of a failed prompt's execution_error, or ''."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return f"{data.get('exception_type')}: {data.get('exception_message')}"
    return ""
