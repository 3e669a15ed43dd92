"""Würstchen v2 end to end through a real ComfyUI server (scripts/comfy_host.py).

The API workflow's PNG must match diffusers' WuerstchenPriorPipeline + WuerstchenDecoderPipeline built from the
same tiny snapshot files (same prompt, seeds, timesteps, guidance): mean abs diff <= 1/255, max <= 8/255 on uint8
pixels. Bad input (wrong-family files in every loader, mismatched embeddings, bad sizes) gives clear errors and
the server keeps serving.
"""
from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from comfy_host import ComfyHost  # noqa: E402

from host_checks import assert_pixels_match, object_info_for, run_failed, run_ok, ui_to_api  # noqa: E402

from fixtures.wuerstchen_snapshot import install_wuerstchen, load_reference, reference_images  # noqa: E402

pytestmark = pytest.mark.host

NODE_IDS = ["WuerstchenPriorLoader", "WuerstchenDecoderLoader", "WuerstchenStageCLoader", "WuerstchenStageBLoader",
            "WuerstchenStageALoader", "WuerstchenTextEncode", "WuerstchenStageC", "WuerstchenStageB", "WuerstchenStageA"]
API = json.loads((ROOT / "example_workflows" / "wuerstchen_t2i.api.json").read_text())
# Prompts as people type them: capitals, surrounding spaces, CJK, a real negative prompt.
PROMPT = "  A Shiba Inu in a SPACESUIT and Helmet, 城市的夜景  "
NEGATIVE = "blurry, Low Quality, watermark "


@pytest.fixture(scope="module")
def host(tmp_path_factory, comfy_host):
    base = tmp_path_factory.mktemp(f"comfy-{comfy_host.name}")
    models = base / "models"
    install_wuerstchen(models)
    prior, dec = models / "diffusers" / "wuerstchen-prior", models / "diffusers" / "wuerstchen"
    files = {"diffusion_models/wuerstchen-stage-c.safetensors": prior / "prior",
             "diffusion_models/wuerstchen-stage-b.safetensors": dec / "decoder",
             "vae/wuerstchen-stage-a.safetensors": dec / "vqgan",
             # wrong pairings
             "diffusion_models/actually-stage-a.safetensors": dec / "vqgan",
             "diffusion_models/actually-clip.safetensors": dec / "text_encoder",
             "vae/actually-stage-c.safetensors": prior / "prior",
             "vae/actually-stage-b.safetensors": dec / "decoder"}
    for dst, src in files.items():
        (models / dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(next(src.glob("*.safetensors")), models / dst)
        if "/wuerstchen-stage-" in "/" + dst:  # the config beside each single file, as <name>.json
            shutil.copy(src / "config.json", (models / dst).with_suffix(".json"))
    # A Stage C file without its config: refused, naming the file to add.
    shutil.copy(prior / "prior" / "diffusion_pytorch_model.safetensors", models / "diffusion_models" / "no-config.safetensors")
    h = ComfyHost(base, comfy_host).start()
    h.prior_root, h.decoder_root = prior, dec
    yield h
    h.stop()


@pytest.fixture(scope="module")
def reference(host):
    return load_reference(host.prior_root, host.decoder_root)


def workflow(c=None, b=None, prompt=PROMPT, negative=NEGATIVE):
    wf = copy.deepcopy(API)
    wf["3"]["inputs"]["text"] = wf["6"]["inputs"]["text"] = prompt
    wf["4"]["inputs"]["text"] = negative
    wf["5"]["inputs"].update(c or {})
    wf["7"]["inputs"].update(b or {})
    return wf


def test_nodes_registered_with_tooltips(host):
    info = object_info_for(host, NODE_IDS)
    assert info["WuerstchenPriorLoader"]["input"]["required"]["snapshot"][0] == ["wuerstchen-prior"]
    assert info["WuerstchenDecoderLoader"]["input"]["required"]["snapshot"][0] == ["wuerstchen"]


@pytest.mark.parametrize("width,height,batch,c_cfg,b_steps,b_cfg,schedule,c_steps", [
    (128, 128, 1, 4.0, 12, 0.0, "wuerstchen_default", 29),   # the reference defaults, smallest size
    (256, 128, 2, 2.5, 3, 3.0, "linear", 5),                  # batch, non-square, decoder CFG, linear prior steps
])
def test_api_workflow_matches_diffusers_pipelines(host, reference, width, height, batch, c_cfg, b_steps, b_cfg,
                                                  schedule, c_steps):
    from waifukit.wuerstchen.sched import timesteps
    c = dict(width=width, height=height, batch_size=batch, seed=11, steps=c_steps, schedule=schedule, cfg=c_cfg)
    b = dict(seed=23, steps=b_steps, cfg=b_cfg)
    wf = workflow(c, b)
    if b_cfg > 1:
        wf["10"] = {"class_type": "WuerstchenTextEncode", "inputs": {"clip": ["2", 1], "text": " LowRes, jpeg artifacts"}}
        wf["7"]["inputs"]["negative"] = ["10", 0]
    ours = run_ok(host, wf)
    ts = timesteps(c_steps, schedule).tolist()
    ref, _ = reference_images(reference, PROMPT, NEGATIVE, width, height, batch, 11, ts, c_cfg, 23, b_steps, b_cfg,
                              decoder_negative=" LowRes, jpeg artifacts" if b_cfg > 1 else "")
    assert len(ours) == batch
    for i in range(batch):
        assert_pixels_match(ours[i], ref[i])


BASE_C = dict(width=128, height=128, batch_size=1, seed=11, steps=29, schedule="wuerstchen_default", cfg=4.0)
BASE_B = dict(seed=23, steps=12, cfg=0.0)
CONTROLS = {  # each input changed on its own, in the node's own widget
    "prompt": dict(prompt="a watercolor painting of a lighthouse at dawn"),
    "negative": dict(negative=""),
    "prior cfg": dict(c={"cfg": 1.0}),
    "prior seed": dict(c={"seed": 12}),
    "decoder seed": dict(b={"seed": 24}),
    "prior steps+schedule": dict(c={"steps": 5, "schedule": "linear"}),
    "decoder steps": dict(b={"steps": 6}),
}


def test_every_input_moves_the_image(host, reference):
    """The controls that prove the parity test can fail: each input changed alone moves our image by
    >= 5/255 mean (the parity bound is 1/255), and the base image matches the reference."""
    from waifukit.wuerstchen.sched import timesteps
    base = run_ok(host, workflow(BASE_C, BASE_B))[0].astype(np.float64)
    ref, _ = reference_images(reference, PROMPT, NEGATIVE, 128, 128, 1, 11, timesteps(29, "wuerstchen_default").tolist(),
                              4.0, 23, 12, 0.0)
    assert_pixels_match(base.astype(np.uint8), ref[0])
    moved = {}
    for name, change in CONTROLS.items():
        wf = workflow(dict(BASE_C, **change.get("c", {})), dict(BASE_B, **change.get("b", {})),
                      prompt=change.get("prompt", PROMPT), negative=change.get("negative", NEGATIVE))
        moved[name] = float(np.abs(run_ok(host, wf)[0].astype(np.float64) - base).mean())
    print("control diffs (/255 mean):", {k: round(v, 2) for k, v in moved.items()})
    assert all(v >= 5.0 for v in moved.values()), moved


def test_single_file_without_its_config_is_refused(host):
    """Defect 6 in the host: a Stage C file alone used to load with a guessed head count."""
    wf = workflow(dict(width=128, height=128, steps=1), dict(steps=1))
    wf["20"] = {"class_type": "WuerstchenStageCLoader", "inputs": {"unet_name": "no-config.safetensors", "dtype": "auto"}}
    wf["5"]["inputs"]["prior"] = ["20", 0]
    message = run_failed(host, wf)
    assert "no-config.json" in message and "warp-ai/wuerstchen-prior prior/config.json" in message, message
    assert host.get("/system_stats")


def test_default_timesteps_are_diffusers_default():
    from diffusers.pipelines.deprecated.wuerstchen.pipeline_wuerstchen_prior import DEFAULT_STAGE_C_TIMESTEPS
    from waifukit.wuerstchen.sched import timesteps
    assert torch.equal(timesteps(API["5"]["inputs"]["steps"], API["5"]["inputs"]["schedule"]),
                       torch.Tensor(DEFAULT_STAGE_C_TIMESTEPS))


def test_single_file_loaders_and_stock_vae_decode(host):
    wf = workflow(dict(width=128, height=128, steps=3), dict(steps=2))
    expected = run_ok(host, wf)[0]
    wf["20"] = {"class_type": "WuerstchenStageCLoader", "inputs": {"unet_name": "wuerstchen-stage-c.safetensors", "dtype": "auto"}}
    wf["21"] = {"class_type": "WuerstchenStageBLoader", "inputs": {"unet_name": "wuerstchen-stage-b.safetensors", "dtype": "auto"}}
    wf["22"] = {"class_type": "WuerstchenStageALoader", "inputs": {"vae_name": "wuerstchen-stage-a.safetensors", "dtype": "auto"}}
    wf["5"]["inputs"]["prior"] = ["20", 0]
    wf["7"]["inputs"]["decoder"] = ["21", 0]
    wf["8"] = {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["22", 0]}}
    assert np.array_equal(run_ok(host, wf)[0], expected)


@pytest.mark.parametrize("node,inputs,target,expect", [
    ("WuerstchenStageCLoader", {"unet_name": "wuerstchen-stage-b.safetensors"}, ("5", "prior"), ["wuerstchen-stage-b", "Stage B decoder", "not a Würstchen v2 Stage C"]),
    ("WuerstchenStageCLoader", {"unet_name": "actually-stage-a.safetensors"}, ("5", "prior"), ["actually-stage-a", "VQGAN"]),
    ("WuerstchenStageCLoader", {"unet_name": "actually-clip.safetensors"}, ("5", "prior"), ["actually-clip", "CLIP text encoder"]),
    ("WuerstchenStageBLoader", {"unet_name": "wuerstchen-stage-c.safetensors"}, ("7", "decoder"), ["wuerstchen-stage-c", "Stage C prior", "not a Würstchen v2 Stage B"]),
    ("WuerstchenStageBLoader", {"unet_name": "actually-stage-a.safetensors"}, ("7", "decoder"), ["actually-stage-a", "VQGAN"]),
    ("WuerstchenStageALoader", {"vae_name": "actually-stage-c.safetensors"}, ("8", "vqgan"), ["actually-stage-c", "Stage C prior"]),
    ("WuerstchenStageALoader", {"vae_name": "actually-stage-b.safetensors"}, ("8", "vqgan"), ["actually-stage-b", "Stage B decoder"]),
])
def test_wrong_files_give_clear_errors_and_server_survives(host, node, inputs, target, expect):
    wf = workflow(dict(width=128, height=128, steps=1), dict(steps=1))
    wf["20"] = {"class_type": node, "inputs": dict(inputs, dtype="auto")}
    wf[target[0]]["inputs"][target[1]] = ["20", 0]
    message = run_failed(host, wf)
    for needle in expect:
        assert needle.lower() in message.lower(), message
    assert host.get("/system_stats")


def test_wrong_wiring_gives_clear_errors(host):
    # The decoder's CLIP into Stage C.
    wf = workflow(dict(width=128, height=128, steps=1), dict(steps=1))
    wf["3"]["inputs"]["clip"] = ["2", 1]
    assert "WuerstchenPriorLoader" in run_failed(host, wf)
    # An ordinary 4-channel latent as Stage B embeddings.
    wf = workflow(dict(width=128, height=128, steps=1), dict(steps=1))
    wf["30"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}}
    wf["7"]["inputs"]["embeddings"] = ["30", 0]
    assert "WuerstchenStageC's output" in run_failed(host, wf)
    # Embeddings resized after Stage C: they no longer match the image Stage C was asked for.
    wf = workflow(dict(width=256, height=256, steps=1), dict(steps=1))
    wf["31"] = {"class_type": "LatentUpscale", "inputs": {"samples": ["5", 0], "upscale_method": "nearest-exact",
                                                          "width": 400, "height": 400, "crop": "disabled"}}
    wf["7"]["inputs"]["embeddings"] = ["31", 0]
    message = run_failed(host, wf)
    assert "made them for 256x256" in message, message
    # Stage C embeddings straight into Stage A.
    wf = workflow(dict(width=128, height=128, steps=1), dict(steps=1))
    wf["8"]["inputs"]["samples"] = ["5", 0]
    assert "WuerstchenStageB first" in run_failed(host, wf)
    # Decoder CFG without a negative.
    wf = workflow(dict(width=128, height=128, steps=1), dict(steps=1, cfg=2.0))
    assert "negative" in run_failed(host, wf)


def test_bad_sizes_and_steps_rejected_before_running(host):
    code, body = host.queue(workflow(dict(width=1000)))
    assert code == 400
    text = json.dumps(body)
    assert "multiple of 128" in text and "nearest valid: 1024" in text, text
    code, body = host.queue(workflow(dict(steps=0)))
    assert code == 400 and "steps" in json.dumps(body)
    assert len(run_ok(host, workflow(dict(width=128, height=128, steps=1), dict(steps=1)))) == 1


def test_ui_workflow_is_the_api_workflow(host):
    ui = json.loads((ROOT / "example_workflows" / "wuerstchen_t2i.json").read_text())
    info = host.get("/object_info")
    assert all(node["type"] in info for node in ui["nodes"])
    expected = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in API.items()}
    assert ui_to_api(ui, info) == expected
