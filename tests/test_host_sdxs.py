"""SDXS end to end through a real ComfyUI server, on a tiny sdxs-shaped snapshot.

The API workflow's PNG must match the reference pipeline (diffusers UNet2DConditionModel + DDPMScheduler +
AutoencoderKL, transformers XLM-R + a Linear projector, one CPU generator for the initial latent and every
DDPM step): mean abs diff <= 1/255, max <= 8/255 on uint8 pixels; also DDIM (eta 0) vs DDIMScheduler.
Bad inputs (wrong-family files, missing projector) give errors naming the problem; the server survives.
"""
from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from comfy_host import ComfyHost  # noqa: E402

from host_checks import assert_pixels_match, object_info_for, run_failed, run_ok, ui_to_api  # noqa: E402

from fixtures.mexma_snapshot import build_mexma_siglip  # noqa: E402
from fixtures.sdxs_snapshot import build_sdxs_snapshot, load_reference, reference_images  # noqa: E402
from fixtures.waifu_snapshot import tiny_transformer  # noqa: E402

pytestmark = pytest.mark.host

NODE_IDS = ["SDXSSnapshotLoader", "SDXSUNetLoader", "SDXSSampler", "MexmaSigLIPImagePrompt", "MexmaSigLIPEncode"]
API = json.loads((ROOT / "example_workflows" / "sdxs_t2i.api.json").read_text())


@pytest.fixture(scope="module")
def host(tmp_path_factory, comfy_host):
    from safetensors.torch import save_file
    base = tmp_path_factory.mktemp(f"comfy_sdxs-{comfy_host.name}")
    models = base / "models"
    snap = build_sdxs_snapshot(models / "diffusers" / "sdxs")
    dm = models / "diffusion_models"
    dm.mkdir(parents=True, exist_ok=True)
    # The UNet as a single file with its sidecar configs, as the single-file loader documents.
    shutil.copy(snap / "unet" / "diffusion_pytorch_model.fp16.safetensors", dm / "sdxs-unet.safetensors")
    shutil.copy(snap / "unet" / "config.json", dm / "sdxs-unet.json")
    shutil.copy(snap / "scheduler" / "scheduler_config.json", dm / "sdxs-unet.scheduler.json")
    shutil.copy(snap / "vae" / "config.json", dm / "sdxs-unet.vae.json")
    # Wrong family: a Waifu transformer to the SDXS loader.
    save_file({k: v.half().contiguous() for k, v in tiny_transformer().state_dict().items()},
              str(dm / "waifu-transformer.safetensors"))
    # Text encoders: the full MEXMA-SigLIP (vision tower) and an XLM-R tower without its projector.
    te = models / "text_encoders"
    build_mexma_siglip(te / "mexma-siglip")
    te.mkdir(parents=True, exist_ok=True)
    shutil.copy(snap / "text_encoder" / "model.fp16.safetensors", te / "xlmr-only.safetensors")
    shutil.copytree(snap / "tokenizer", te / "xlmr-only_tokenizer")
    h = ComfyHost(base, comfy_host).start()
    h.snapshot = snap
    yield h
    h.stop()


@pytest.fixture(scope="module")
def reference(host):
    return load_reference(host.snapshot)


def workflow(**sampler):
    wf = copy.deepcopy(API)
    wf["1"]["inputs"]["dtype"] = "fp32"
    wf["4"]["inputs"].update(sampler)
    return wf


def test_nodes_registered_with_tooltips(host):
    info = object_info_for(host, NODE_IDS)
    assert info["SDXSSnapshotLoader"]["input"]["required"]["snapshot"][0] == ["sdxs"]


@pytest.mark.parametrize("width,height,batch,sampler", [(128, 128, 1, "ddpm"), (192, 128, 2, "ddpm"),
                                                        (128, 128, 1, "ddim")])
def test_api_workflow_matches_reference(host, reference, width, height, batch, sampler):
    prompt = API["2"]["inputs"]["text"]
    seed, steps, cfg = 7, 4, 5.5
    ours = run_ok(host, workflow(seed=seed, steps=steps, cfg=cfg, width=width, height=height, batch_size=batch,
                                 sampler=sampler))
    ref = reference_images(reference, prompt, "", seed, steps, cfg, width, height, batch, sampler)
    assert len(ours) == batch
    for i in range(batch):
        assert_pixels_match(ours[i], ref[i])


def test_single_file_unet_and_stock_ksampler(host):
    wf = workflow(seed=3, steps=2, width=64, height=64)
    expected = run_ok(host, wf)[0]
    wf["10"] = {"class_type": "SDXSUNetLoader", "inputs": {"unet_name": "sdxs-unet.safetensors", "dtype": "fp32"}}
    wf["4"]["inputs"]["model"] = ["10", 0]
    assert np.array_equal(run_ok(host, wf)[0], expected)
    # The MODEL is a regular ComfyUI model: the stock KSampler runs it on the pooled conditioning.
    wf["11"] = {"class_type": "WaifuEmptyLatent", "inputs": {"bucket": "384x384 (1:1)", "batch_size": 1}}
    wf["4"] = {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["11", 0], "seed": 1,
        "steps": 2, "cfg": 5.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    assert run_ok(host, wf)[0].shape == (384, 384, 3)


def test_image_prompt_changes_the_image(host):
    wf = workflow(seed=4, steps=2, width=64, height=64)
    plain = run_ok(host, wf)[0]
    wf["20"] = {"class_type": "MexmaSigLIPLoader", "inputs": {"text_encoder_name": "mexma-siglip", "dtype": "fp32"}}
    wf["21"] = {"class_type": "EmptyImage", "inputs": {"width": 80, "height": 64, "batch_size": 1, "color": 0xff8040}}
    # The tiny mexma-siglip has its own random weights: encode with it so the widths agree.
    wf["2"]["inputs"]["text_encoder"] = wf["3"]["inputs"]["text_encoder"] = ["20", 0]
    text_only = run_ok(host, wf)[0]  # text-only through the visheratin layout
    wf["22"] = {"class_type": "MexmaSigLIPImagePrompt",
                "inputs": {"conditioning": ["2", 0], "text_encoder": ["20", 0], "image": ["21", 0], "weight": 0.7}}
    wf["4"]["inputs"]["positive"] = ["22", 0]
    mixed = run_ok(host, wf)[0]
    assert mixed.shape == plain.shape and not np.array_equal(mixed, text_only)
    # The same mix through MexmaSigLIPEncode's optional image input gives the same image.
    wf["2"]["inputs"].update(image=["21", 0], image_weight=0.7)
    wf["4"]["inputs"]["positive"] = ["2", 0]
    assert np.array_equal(run_ok(host, wf)[0], mixed)


@pytest.mark.parametrize("case,expect", [
    ("waifu_to_sdxs", ["waifu-transformer.safetensors", "Sana/Waifu"]),
    ("sdxs_to_waifu", ["sdxs-unet.safetensors", "a UNet"]),
    ("no_projector", ["missing projector weights"]),
])
def test_bad_inputs_give_clear_errors_and_server_survives(host, case, expect):
    wf = workflow(steps=1, width=64, height=64)
    if case == "waifu_to_sdxs":
        wf["20"] = {"class_type": "SDXSUNetLoader", "inputs": {"unet_name": "waifu-transformer.safetensors", "dtype": "auto"}}
        wf["4"]["inputs"]["model"] = ["20", 0]
    elif case == "sdxs_to_waifu":
        wf["20"] = {"class_type": "LinearDiTLoader", "inputs": {"unet_name": "sdxs-unet.safetensors", "dtype": "auto"}}
        wf["4"]["inputs"]["model"] = ["20", 0]
    else:
        wf["20"] = {"class_type": "MexmaSigLIPLoader", "inputs": {"text_encoder_name": "xlmr-only.safetensors", "dtype": "auto"}}
        wf["2"]["inputs"]["text_encoder"] = wf["3"]["inputs"]["text_encoder"] = ["20", 0]
    message = run_failed(host, wf)
    for needle in expect:
        assert needle.lower() in message.lower(), message
    assert host.get("/system_stats")


def test_bad_size_rejected_before_running(host):
    code, body = host.queue(workflow(width=501))
    assert code == 400 and "nearest valid: 504" in json.dumps(body)


def test_ui_workflow_is_the_api_workflow(host):
    ui = json.loads((ROOT / "example_workflows" / "sdxs_t2i.json").read_text())
    info = host.get("/object_info")
    expected = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in API.items()}
    assert ui_to_api(ui, info) == expected
