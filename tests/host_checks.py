"""Checks shared by the real-host tests: run a workflow, compare pixels, read errors, UI -> API format."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from comfy_host import error_message  # noqa: E402


def run_ok(host, wf) -> list[np.ndarray]:
    """Queue an API workflow, require success, return its images as uint8 arrays."""
    entry = host.run(wf)
    assert entry["status"]["status_str"] == "success", error_message(entry) or entry["status"]
    return [np.asarray(Image.open(p).convert("RGB")) for p in host.output_images(entry)]


def run_failed(host, wf) -> str:
    """Queue an API workflow, require an execution error, return its message."""
    entry = host.run(wf)
    assert entry["status"]["status_str"] == "error", entry["status"]
    return error_message(entry)


def object_info_for(host, node_ids) -> dict:
    """/object_info, after checking that every id registered (a failed pack import never stops ComfyUI) with
    the pack's category and a tooltip on every input."""
    info = host.get("/object_info")
    missing = [n for n in node_ids if n not in info]
    assert not missing, f"not registered (import failure?): {missing}\n{host.log_tail()}"
    for name in node_ids:
        assert info[name]["category"] == "waifu"
        for section in ("required", "optional"):
            for inp, spec in info[name]["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"
    return info


def assert_pixels_match(ours: np.ndarray, ref: np.ndarray, mean: float = 1.0, peak: float = 8.0):
    """The pack's pixel parity bound: mean abs diff <= 1/255 and max <= 8/255 on uint8 images."""
    assert ours.shape == ref.shape
    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    print(f"pixel diff vs reference: mean {diff.mean():.3f}/255, max {diff.max():.0f}/255")
    assert diff.mean() <= mean and diff.max() <= peak, f"mean {diff.mean():.3f}/255, max {diff.max():.0f}/255"


WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """What the frontend does on Queue: widget values by position, links by id (ComfyUI's rules for V1 nodes)."""
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        spec = object_info[node["type"]]["input"]
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        widgets = list(node.get("widgets_values", []))
        inputs = {}
        for section in ("required", "optional"):
            for name, (typ, *opts) in spec.get(section, {}).items():
                if name in linked:
                    link = links[linked[name]]
                    inputs[name] = [str(link[1]), link[2]]
                elif isinstance(typ, list) or typ in WIDGET_TYPES:
                    if not widgets and section == "optional":
                        continue  # a workflow saved before this optional widget was appended: its default
                    inputs[name] = widgets.pop(0)
                    if opts and opts[0].get("control_after_generate"):
                        widgets.pop(0)  # the "fixed/randomize" value stored after a seed
        assert not widgets, f"node {node['id']} has {len(widgets)} widget values left over"
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api
