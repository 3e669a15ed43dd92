"""Every example workflow in the real frontend: Debian's chromium driven by Playwright against the real server.

For each UI-format workflow in example_workflows/: load it into the canvas, check that every node type is
registered and none is red, queue it from the page on the tiny models, and see the output image appear; a
screenshot of each graph goes to test-artifacts/.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from comfy_host import ComfyHost  # noqa: E402

from fixtures.catalog import install_all  # noqa: E402

pytestmark = pytest.mark.host

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / "test-artifacts"
WORKFLOWS = sorted(p for p in (ROOT / "example_workflows").glob("*.json") if not p.name.endswith(".api.json"))
CHROME_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]


# Frame the whole graph for the screenshot (LiteGraph draws at (pos + offset) * scale).
FIT_VIEW = """() => {
    const c = window.app.canvas, nodes = window.app.graph._nodes;
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const n of nodes) {
        x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 40);
        x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
    }
    const W = c.canvas.clientWidth, H = c.canvas.clientHeight;
    const s = Math.min((W - 140) / (x1 - x0), (H - 160) / (y1 - y0), 1.0);
    c.ds.scale = s;
    c.ds.offset = [90 / s - x0, 110 / s - y0];
    c.setDirty(true, true);
}"""


@pytest.fixture(scope="module")
def host(tmp_path_factory, comfy_host):
    base = tmp_path_factory.mktemp(f"browser-{comfy_host.name}")
    install_all(base / "models")
    # A returning user: no first-run template browser over the canvas.
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    h = ComfyHost(base, comfy_host, extra_args=["--preview-method", "latent2rgb"]).start()
    yield h
    h.stop()


@pytest.fixture(scope="module")
def page(host):
    if not CHROMIUM:
        pytest.skip("chromium is not installed (make test installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROME_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 900})
        page.goto(host.url, wait_until="domcontentloaded")
        page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
        yield page
        browser.close()


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflow_in_the_browser(host, page, path):
    workflow = json.loads(path.read_text())
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
    report = page.evaluate("""() => {
        const nodes = window.app.graph._nodes;
        return {
            count: nodes.length,
            missing: nodes.filter(n => !(n.type in window.LiteGraph.registered_node_types)).map(n => n.type),
            red: nodes.filter(n => n.has_errors).map(n => n.type),
        };
    }""")
    assert report["count"] == len(workflow["nodes"])
    assert report["missing"] == [], f"unknown node types in {path.name}: {report['missing']}"
    assert report["red"] == [], f"red nodes in {path.name}: {report['red']}"

    before = set(host.get("/history"))
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    deadline, entry = time.time() + 600, None
    while time.time() < deadline:
        new = {k: v for k, v in host.get("/history").items() if k not in before}
        if new:
            entry = next(iter(new.values()))
            if entry["status"].get("completed") or entry["status"].get("status_str") == "error":
                break
        errors = page.evaluate("() => window.app.lastNodeErrors")
        assert not errors, f"validation errors in {path.name}: {errors}"
        time.sleep(0.5)
    assert entry is not None and entry["status"]["status_str"] == "success", entry and entry["status"]
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert images, f"{path.name} produced no image"
    # The output image is shown on the SaveImage node in the canvas.
    page.wait_for_function("() => Object.values(window.app.nodeOutputs || {}).some(o => o.images && o.images.length)",
                           timeout=30_000)
    red = page.evaluate("() => window.app.graph._nodes.filter(n => n.has_errors).map(n => n.type)")
    assert red == []
    page.evaluate(FIT_VIEW)
    page.wait_for_timeout(300)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{path.stem}-{host.host.name}.png"))


def test_every_pack_node_is_registry_ready(host):
    """Consistent category and display names, a tooltip on every input, a description on every node."""
    info = host.get("/object_info")
    ours = {k: v for k, v in info.items() if v["python_module"].startswith("custom_nodes.comfyui-waifu")}
    assert len(ours) >= 8
    for name, node in ours.items():
        assert node["category"].split("/")[0] == "waifu", name
        assert node["display_name"] and node["display_name"] != name, name
        assert node["description"], f"{name} has no DESCRIPTION"
        for section in ("required", "optional"):
            for inp, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"
