"""Registry readiness of pyproject.toml (docs.comfy.org/registry/specifications)."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_is_registry_ready():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project, comfy = meta["project"], meta["tool"]["comfy"]
    name = project["name"]
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", name)
    assert "comfyui" not in name.lower()  # registry best practice
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert (ROOT / project["license"]["file"]).is_file()
    assert project["urls"]["Repository"].startswith("https://")
    assert project["description"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert comfy["Icon"].endswith("docs/icon.svg") and (ROOT / "docs" / "icon.svg").is_file()
    assert comfy["requires-comfyui"].startswith(">=")
    assert all((ROOT / folder).is_dir() for folder in comfy["includes"])
    for dep in project["dependencies"]:
        assert not dep.startswith("diffusers"), "diffusers is a test-only oracle"
