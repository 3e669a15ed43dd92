"""Published containers through the loader nodes in a real ComfyUI server (tiny copies, published names).

One waifu-2b snapshot (text encoder as published: fp32 data in model.fp16.safetensors, here with pooler keys)
and the same weights in the other containers users meet: the snapshot saved in shards (fp16 variant names,
``*.safetensors.index.fp16.json``) with a ``.bin`` twin beside the VAE, recoilme's save_checkpoint ``.pth``
(numpy rng_state under numpy-1 names), and a sharded transformer folder picked by one of its shards in
LinearDiTLoader's list. Each must give the snapshot's image (which matches the WaifuPipeline reference):
mean abs diff <= 1/255, max <= 8/255; control: another seed moves the image >= 5/255 mean.
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

from host_checks import assert_pixels_match, run_failed, run_ok  # noqa: E402

from fixtures.containers import add_bin_twin, shard_component  # noqa: E402
from fixtures.waifu_snapshot import (build_waifu_snapshot, load_reference, reference_images,  # noqa: E402
                                     save_sana_checkpoint)

pytestmark = pytest.mark.host

API = json.loads((ROOT / "example_workflows" / "waifu_t2i.api.json").read_text())
PROMPT, NEGATIVE = "  1Girl, Silver Hair, 赤い目  ", "Lowres, Blurry"
SEED, STEPS, CFG, SIDE = 5, 3, 4.5, 128


@pytest.fixture(scope="module")
def host(tmp_path_factory, comfy_host):
    import torch

    from waifukit import loading
    base = tmp_path_factory.mktemp(f"comfy-layouts-{comfy_host.name}")
    models = base / "models"
    snap = build_waifu_snapshot(models / "diffusers" / "waifu-2b", te_pooler=True)
    sharded = shutil.copytree(snap, models / "diffusers" / "waifu-2b-sharded")
    shard_component(sharded / "transformer" / "diffusion_pytorch_model.fp16.safetensors", shards=3)
    shard_component(sharded / "text_encoder" / "model.fp16.safetensors", shards=2)
    add_bin_twin(sharded / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    broken = shutil.copytree(sharded, models / "diffusers" / "waifu-2b-missing-shard")
    (broken / "transformer" / "diffusion_pytorch_model.fp16-00002-of-00003.safetensors").unlink()
    dm = models / "diffusion_models"
    dm.mkdir(parents=True)
    sd = {k: v.float() for k, v in loading.resolve_linear_dit(snap).state_dict.items()}
    sd["y_embedder.y_embedding"] = torch.zeros(512, 128)
    save_sana_checkpoint(sd, dm / "waifu-2b-v09.pth")
    folder = shutil.copytree(snap / "transformer", dm / "waifu-dit-sharded")
    shard_component(folder / "diffusion_pytorch_model.fp16.safetensors", shards=3)
    h = ComfyHost(base, comfy_host).start()
    h.snapshot = snap
    yield h
    h.stop()


def workflow(snapshot="waifu-2b", seed=SEED, unet=None):
    wf = copy.deepcopy(API)
    wf["1"]["inputs"].update(snapshot=snapshot, dtype="fp32")
    wf["2"]["inputs"]["text"], wf["3"]["inputs"]["text"] = PROMPT, NEGATIVE
    wf["4"]["inputs"].update(seed=seed, steps=STEPS, cfg=CFG, width=SIDE, height=SIDE)
    if unet:
        wf["10"] = {"class_type": "LinearDiTLoader", "inputs": {"unet_name": unet, "dtype": "fp32"}}
        wf["4"]["inputs"]["model"] = ["10", 0]
    return wf


def test_published_containers_give_the_snapshot_image(host):
    expected = run_ok(host, workflow())[0]
    reference = reference_images(load_reference(host.snapshot), PROMPT, NEGATIVE, SEED, STEPS, CFG, SIDE, SIDE)[0]
    assert_pixels_match(expected, reference)
    for name, wf in {"sharded snapshot + .bin twin": workflow("waifu-2b-sharded"),
                     "save_checkpoint .pth": workflow(unet="waifu-2b-v09.pth"),
                     "one shard picked": workflow(unet="waifu-dit-sharded/"
                                                       "diffusion_pytorch_model.fp16-00002-of-00003.safetensors")
                     }.items():
        print(name)
        assert_pixels_match(run_ok(host, wf)[0], expected)
    # Control: the comparison can fail; another seed is far off.
    moved = np.abs(run_ok(host, workflow(seed=SEED + 1))[0].astype(float) - expected.astype(float)).mean()
    print(f"control seed: {moved:.2f}/255 mean")
    assert moved >= 5.0


def test_missing_shard_is_named(host):
    msg = run_failed(host, workflow("waifu-2b-missing-shard"))
    assert "diffusion_pytorch_model.fp16-00002-of-00003.safetensors" in msg and "Download" in msg, msg
