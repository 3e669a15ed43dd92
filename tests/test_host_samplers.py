"""Every sampler of the pack, in one server with every family's tiny models: a progress event per step, and an
interrupt honoured mid-run with the server still serving afterwards."""
from __future__ import annotations

import json
import sys
import threading
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from comfy_host import ComfyHost  # noqa: E402

from fixtures.catalog import install_all  # noqa: E402
from host_checks import run_ok  # noqa: E402

pytestmark = pytest.mark.host

# (workflow, sampler node id, quick inputs, long inputs)
SAMPLERS = [
    ("waifu", "4", {"steps": 4, "width": 64, "height": 64}, {"steps": 1000, "width": 512, "height": 512}),
    ("sdxs", "4", {"steps": 4, "width": 64, "height": 64}, {"steps": 900, "width": 512, "height": 512}),
    ("wuerstchen", "5", {"steps": 4, "schedule": "linear", "width": 128, "height": 128},
     {"steps": 1000, "schedule": "linear", "width": 1024, "height": 1024}),
    ("wuerstchen", "7", {"steps": 4}, {"steps": 1000}),
]


@pytest.fixture(scope="module")
def host(tmp_path_factory, comfy_host):
    base = tmp_path_factory.mktemp(f"samplers-{comfy_host.name}")
    install_all(base / "models")
    h = ComfyHost(base, comfy_host, extra_args=["--preview-method", "latent2rgb"]).start()
    yield h
    h.stop()


def workflow(family, node, inputs, fast_others=True):
    wf = json.loads((ROOT / "example_workflows" / f"{family}_t2i.api.json").read_text())
    if family == "wuerstchen" and fast_others:  # keep the other stage quick
        wf["5"]["inputs"].update(steps=2, schedule="linear", width=128, height=128)
        wf["7"]["inputs"].update(steps=2)
    elif fast_others:
        wf[node]["inputs"].update(width=64, height=64)
    wf[node]["inputs"].update(inputs)
    return wf


def events(host, wf, interrupt_node=None):
    """Run wf on a websocket client; returns (progress values per node, final event type, its data); binary
    preview frames are counted in progress["previews"]."""
    import websocket

    client = uuid.uuid4().hex
    ws = websocket.create_connection(f"ws://127.0.0.1:{host.port}/ws?clientId={client}", timeout=300)
    progress, sent = {}, False
    try:
        code, body = host.queue(wf, client)
        assert code == 200, body
        while True:
            msg = ws.recv()
            if not isinstance(msg, str):
                if int.from_bytes(msg[:4], "big") == 1:  # PREVIEW_IMAGE
                    progress["previews"] = progress.get("previews", 0) + 1
                continue
            m = json.loads(msg)
            data = m["data"]
            if data.get("prompt_id") not in (None, body["prompt_id"]):
                continue
            if m["type"] == "progress":
                progress.setdefault(data["node"], []).append(data["value"])
                if interrupt_node == data["node"] and data["value"] >= 2 and not sent:
                    threading.Thread(target=host.post, args=("/interrupt", {})).start()
                    sent = True
            if m["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                return progress, m["type"], data
    finally:
        ws.close()


def throttles_progress(host) -> bool:
    return "PROGRESS_THROTTLE_MIN_INTERVAL" in (host.comfyui / "comfy" / "utils.py").read_text()


@pytest.mark.parametrize("family,node,quick,long", SAMPLERS, ids=[f"{s[0]}-{s[1]}" for s in SAMPLERS])
def test_progress_per_step_and_interrupt(host, family, node, quick, long):
    progress, kind, _ = events(host, workflow(family, node, quick))
    assert kind == "execution_success"
    if throttles_progress(host):
        # ComfyUI >= 0.33 drops plain progress events closer than its throttle interval (comfy/utils.py
        # ProgressBar); the first and the last always arrive, and every step still checks for interrupts.
        assert progress[node][0] == 1 and progress[node][-1] == 4 and progress[node] == sorted(set(progress[node]))
    else:
        assert progress[node] == [1, 2, 3, 4]
    progress, kind, data = events(host, workflow(family, node, long), interrupt_node=node)
    assert kind == "execution_interrupted", data.get("exception_message", data)
    assert data["node_id"] == node
    assert len(run_ok(host, workflow(family, node, quick))) == 1  # still serving


# Stage C latents are EfficientNet features with no decoder of their own: no previews there.
PREVIEWED = [s for s in SAMPLERS if (s[0], s[1]) != ("wuerstchen", "5")]


@pytest.mark.parametrize("family,node,quick,long", PREVIEWED, ids=[f"{s[0]}-{s[1]}" for s in PREVIEWED])
def test_latent_previews(host, family, node, quick, long):
    wf = workflow(family, node, quick)
    if family == "wuerstchen":
        wf["5"]["inputs"]["steps"] = 1  # only Stage B's frames then
    progress, kind, _ = events(host, wf)
    assert kind == "execution_success"
    assert progress.get("previews", 0) >= 4
