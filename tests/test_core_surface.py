"""The pack reaches ComfyUI core only through nodes/core_api.py, and core_api.SURFACE lists every core name it
uses (read from the source, no ComfyUI needed). The host tests check each entry binds on every host."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE_TOPS = {"comfy", "folder_paths", "latent_preview", "nodes", "server", "execution", "comfy_api", "comfy_extras",
             "node_helpers", "comfy_execution"}
# core_api's aliases -> the dotted prefix they stand for
ALIASES = {"mm": "comfy.model_management", "folder_paths": "folder_paths", "latent_preview": "latent_preview",
           "cli_args": "comfy.cli_args.args", "ModelType": "comfy.model_base.ModelType",
           "LatentPreviewMethod": "comfy.cli_args.LatentPreviewMethod", "ProgressBar": "comfy.utils.ProgressBar"}


def _surface_names() -> set[str]:
    tree = ast.parse((ROOT / "nodes" / "core_api.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Use":
            names.add(node.args[0].value)
    return names


def _pack_files():
    return [p for p in sorted((ROOT / "nodes").glob("*.py")) if p.name != "core_api.py"] + \
        sorted((ROOT / "waifukit").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py")) + [ROOT / "__init__.py"]


def test_only_core_api_imports_core():
    offenders = []
    for path in _pack_files():
        for node in ast.walk(ast.parse(path.read_text())):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            for mod in mods:
                if mod.split(".")[0] in CORE_TOPS and not (path.name == "__init__.py" and mod == "comfy"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {mod}")
    assert not offenders, "import core through nodes/core_api.py:\n" + "\n".join(offenders)


def test_every_core_attribute_the_pack_reads_is_in_the_surface():
    surface = _surface_names()
    missing = []
    for path in _pack_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ALIASES:
                dotted = f"{ALIASES[node.value.id]}.{node.attr}"
                if dotted not in surface:
                    missing.append(f"{path.relative_to(ROOT)}:{node.lineno} {dotted}")
    assert not missing, "add these to core_api.SURFACE:\n" + "\n".join(missing)
    assert len(surface) >= 30
