"""SDXS end to end through a real ComfyUI server, on tiny sdxs-shaped snapshots.

The API workflow's PNG must match the reference pipeline (tests/fixtures/sdxs_snapshot.py: the AiArtLab/sdxs
card's code step by step on diffusers/transformers components; prompts as typed, one CPU generator for the
initial latent and every DDPM step): mean abs diff <= 1/255, max <= 8/255 on uint8 pixels; also DDIM (eta 0)
vs DDIMScheduler. Prompts as users type them (capitals, surrounding spaces, CJK) and a real negative prompt.
Each comparison carries controls: the reference with another prompt, negative, CFG, seed or scheduler is
>= 5/255 mean away from our image, so the bound can fail. Two snapshots: "sdxs" (scaled_linear, epsilon,
projector with bias) and "sdxs-cosine" (squaredcos_cap_v2, sample prediction, clip_sample, trailing spacing,
projector without bias). Bad inputs (wrong-family files, missing projector, per-channel latent statistics)
give errors naming the problem; the server survives.
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
PROMPT = "  A Girl with an Umbrella in the RAIN, Anime Style  "
PROMPT_CJK = "一个女孩在雨中撑着伞，动漫风格"
NEGATIVE = "Blurry, low quality, watermark"
# A scheduler config far from the default one in every setting diffusers' DDPMScheduler takes and that is not
# the default: the cosine schedule core's make_beta_schedule returned as numpy (TypeError in torch.cumprod).
COSINE = dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample", clip_sample=True, clip_sample_range=1.0,
              timestep_spacing="trailing", steps_offset=0)
CONTROL_MIN = 5.0  # /255 mean


@pytest.fixture(scope="module")
def host(tmp_path_factory, comfy_host):
    from safetensors.torch import save_file
    base = tmp_path_factory.mktemp(f"comfy_sdxs-{comfy_host.name}")
    models = base / "models"
    snap = build_sdxs_snapshot(models / "diffusers" / "sdxs")
    cosine = build_sdxs_snapshot(models / "diffusers" / "sdxs-cosine", seed=1, scheduler=COSINE,
                                 projector_bias=False)
    dm = models / "diffusion_models"
    dm.mkdir(parents=True, exist_ok=True)
    # The UNet as a single file with its sidecar configs, as the single-file loader documents.
    for name, vae_extra in (("sdxs-unet", {}), ("sdxs-stats", {"latents_mean": [0.1] * 16, "latents_std": [2.0] * 16})):
        shutil.copy(snap / "unet" / "diffusion_pytorch_model.fp16.safetensors", dm / f"{name}.safetensors")
        shutil.copy(snap / "unet" / "config.json", dm / f"{name}.json")
        shutil.copy(snap / "scheduler" / "scheduler_config.json", dm / f"{name}.scheduler.json")
        vae_cfg = dict(json.loads((snap / "vae" / "config.json").read_text()), **vae_extra)
        (dm / f"{name}.vae.json").write_text(json.dumps(vae_cfg))
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
    h.snapshots = {"sdxs": snap, "sdxs-cosine": cosine}
    yield h
    h.stop()


@pytest.fixture(scope="module")
def references(host):
    return {name: load_reference(path) for name, path in host.snapshots.items()}


def workflow(snapshot="sdxs", prompt=PROMPT, negative=NEGATIVE, **sampler):
    wf = copy.deepcopy(API)
    wf["1"]["inputs"].update(dtype="fp32", snapshot=snapshot)
    wf["2"]["inputs"]["text"] = prompt
    wf["3"]["inputs"]["text"] = negative
    wf["4"]["inputs"].update(sampler)
    return wf


def _mean_diff(a, b) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def test_nodes_registered_with_tooltips(host):
    info = object_info_for(host, NODE_IDS)
    assert sorted(info["SDXSSnapshotLoader"]["input"]["required"]["snapshot"][0]) == ["sdxs", "sdxs-cosine"]
    assert info["MexmaSigLIPEncode"]["input"]["optional"]["prompt_format"][0][0].startswith("auto")


CASES = [  # snapshot, prompt, width, height, batch, sampler
    ("sdxs", PROMPT, 128, 128, 1, "ddpm"),
    ("sdxs", PROMPT_CJK, 192, 128, 2, "ddpm"),
    ("sdxs", PROMPT, 128, 128, 1, "ddim"),
    ("sdxs-cosine", PROMPT, 128, 128, 1, "ddpm"),
]


@pytest.mark.parametrize("snapshot,prompt,width,height,batch,sampler", CASES)
def test_api_workflow_matches_reference(host, references, snapshot, prompt, width, height, batch, sampler):
    ref = references[snapshot]
    args = dict(prompt=prompt, negative=NEGATIVE, seed=7, steps=4, cfg=5.5, width=width, height=height,
                batch_size=batch, sampler=sampler)

    def reference(**change):
        a = dict(args, **change)
        return reference_images(ref, a["prompt"], a["negative"], a["seed"], a["steps"], a["cfg"], a["width"],
                                a["height"], a["batch_size"], a["sampler"])

    ours = run_ok(host, workflow(snapshot, prompt, NEGATIVE, seed=7, steps=4, cfg=5.5, width=width, height=height,
                                 batch_size=batch, sampler=sampler))
    expected = reference()
    assert len(ours) == batch
    for i in range(batch):
        assert_pixels_match(ours[i], expected[i])
    # Controls: each input visibly moves the image, far past the bound above.
    other = PROMPT_CJK if prompt == PROMPT else PROMPT
    controls = {"prompt": reference(prompt=other), "negative": reference(negative=""), "cfg": reference(cfg=0.0),
                "seed": reference(seed=8), "scheduler": reference(sampler="ddim" if sampler == "ddpm" else "ddpm")}
    moved = {k: round(_mean_diff(ours[0], v[0]), 2) for k, v in controls.items()}
    print("controls (mean /255):", moved)
    assert all(v >= CONTROL_MIN for v in moved.values()), moved


def test_prompt_reaches_sdxs_as_typed(host, references):
    """Defect 1: the old node lower-cased and stripped every prompt. The image from the lower-cased prompt is
    outside the bound (so test_api_workflow_matches_reference fails on the old code), and the prompt_format
    widget makes the Waifu format an explicit choice that gives exactly that image."""
    ref = references["sdxs"]
    typed = reference_images(ref, PROMPT, NEGATIVE, 7, 4, 5.5, 128, 128)[0]
    lowered = reference_images(ref, PROMPT.lower().strip(), NEGATIVE.lower().strip(), 7, 4, 5.5, 128, 128)[0]
    diff = np.abs(typed.astype(np.float64) - lowered.astype(np.float64))
    print(f"as typed vs lower-cased: mean {diff.mean():.2f}/255, max {diff.max():.0f}/255")
    assert diff.max() > 8 and diff.mean() > 1  # fails assert_pixels_match
    wf = workflow(seed=7, steps=4, cfg=5.5, width=128, height=128)
    for node in ("2", "3"):
        wf[node]["inputs"]["prompt_format"] = "lowercase + strip (Waifu)"
    assert_pixels_match(run_ok(host, wf)[0], lowered)
    for node in ("2", "3"):
        wf[node]["inputs"]["prompt_format"] = "as typed (SDXS)"
    assert_pixels_match(run_ok(host, wf)[0], typed)


@pytest.mark.parametrize("snapshot", ["sdxs", "sdxs-cosine"])
def test_single_file_unet_and_stock_ksampler(host, snapshot):
    wf = workflow(snapshot, seed=3, steps=2, width=64, height=64)
    expected = run_ok(host, wf)[0]
    if snapshot == "sdxs":
        wf["10"] = {"class_type": "SDXSUNetLoader", "inputs": {"unet_name": "sdxs-unet.safetensors", "dtype": "fp32"}}
        wf["4"]["inputs"]["model"] = ["10", 0]
        assert np.array_equal(run_ok(host, wf)[0], expected)
    # The MODEL is a regular ComfyUI model: the stock KSampler runs it on the pooled conditioning (the
    # squaredcos_cap_v2 one raised a TypeError in core's ModelSamplingDiscrete before).
    wf["11"] = {"class_type": "WaifuEmptyLatent", "inputs": {"bucket": "384x384 (1:1)", "batch_size": 1}}
    wf["4"] = {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["11", 0], "seed": 1,
        "steps": 4, "cfg": 5.5, "sampler_name": "ddim", "scheduler": "ddim_uniform", "denoise": 1.0}}
    first = run_ok(host, wf)[0]
    assert first.shape == (384, 384, 3)
    wf["2"]["inputs"]["text"] = PROMPT_CJK  # control: the conditioning reaches the stock sampler
    assert _mean_diff(run_ok(host, wf)[0], first) >= CONTROL_MIN


MODEL_SAMPLING_CHECK = """
import diffusers
from waifu_pack.nodes import sdxs_host
from waifu_pack.waifukit.ddpm import DDPMParams, DiscreteSchedule
CONFIGS = [
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="epsilon", clip_sample=False),
    dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample", clip_sample=True, clip_sample_range=0.8),
    dict(beta_schedule="linear", prediction_type="v_prediction", rescale_betas_zero_snr=True, thresholding=True,
         dynamic_thresholding_ratio=0.9, sample_max_value=1.5),
    dict(trained_betas=[0.0001 + 0.0005 * i for i in range(40)], num_train_timesteps=40, prediction_type="v_prediction",
         clip_sample=False),
]
worst = 0.0
for cfg in CONFIGS:
    ref = diffusers.DDPMScheduler(**cfg)
    schedule = DiscreteSchedule(DDPMParams.from_scheduler_config(dict(ref.config)))
    ms = sdxs_host.model_sampling(schedule)
    ac = ref.alphas_cumprod.double().clone()
    if cfg.get("rescale_betas_zero_snr"):
        ac[-1] = 4.8973451890853435e-08  # core's zero-SNR stand-in
    assert torch.equal(ms.sigmas, (((1 - ac) / ac) ** 0.5).float()), cfg
    ref.set_timesteps(10)
    limit = sdxs_host._x0_limit(schedule)
    g = torch.Generator().manual_seed(0)
    for t in ref.timesteps[:-1].tolist():
        x_t, out = torch.randn(2, 4, 4, 4, generator=g) * 1.5, torch.randn(2, 4, 4, 4, generator=g) * 1.5
        sigma = ms.sigmas[t]
        x_k = x_t * (1 + sigma.double() ** 2).sqrt().float()  # k-diffusion's x for the same noisy sample
        assert torch.allclose(ms.calculate_input(sigma, x_k), x_t, atol=1e-5)
        assert int(ms.timestep(sigma)) == t
        denoised = limit({"denoised": ms.calculate_denoised(sigma, out, x_k)})
        expected = ref.step(out, t, x_t, generator=torch.Generator().manual_seed(1)).pred_original_sample
        err = ((denoised - expected).abs().max() / expected.abs().max()).item()
        worst = max(worst, err)
        assert err <= 1e-4, (cfg, t, err)
        if cfg.get("clip_sample") or cfg.get("thresholding"):  # control: the limit is applied
            assert not torch.allclose(ms.calculate_denoised(sigma, out, x_k), expected, atol=1e-3)
patcher = sdxs_host.load_unet(SNAPSHOT, "fp32")
assert len(patcher.model_options["sampler_post_cfg_function"]) == 1
assert patcher.model.model_sampling.sigmas.shape == (1000,)
print("MODEL SAMPLING OK, worst rel err", worst)
"""


def test_model_sampling_is_the_diffusers_schedule(host, comfy_host):
    """Defect 2: core's model sampling (what stock samplers use) on the exact diffusers schedule for every beta
    schedule, zero-SNR and trained betas; ComfyUI's denoised (+ the post-CFG clip/threshold) equals diffusers'
    pred_original_sample at each timestep (<= 1e-4 relative); the squaredcos_cap_v2 snapshot loads (it raised
    TypeError in torch.cumprod before)."""
    from test_host_inprocess import run
    out = run(comfy_host, f"SNAPSHOT = {str(host.snapshots['sdxs-cosine'])!r}\n" + MODEL_SAMPLING_CHECK)
    print(out.strip().splitlines()[-1])
    assert "MODEL SAMPLING OK" in out


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
    ("latent_stats", ["sdxs-stats.vae.json", "latents_mean and latents_std"]),
])
def test_bad_inputs_give_clear_errors_and_server_survives(host, case, expect):
    wf = workflow(steps=1, width=64, height=64)
    if case == "waifu_to_sdxs":
        wf["20"] = {"class_type": "SDXSUNetLoader", "inputs": {"unet_name": "waifu-transformer.safetensors", "dtype": "auto"}}
        wf["4"]["inputs"]["model"] = ["20", 0]
    elif case == "sdxs_to_waifu":
        wf["20"] = {"class_type": "LinearDiTLoader", "inputs": {"unet_name": "sdxs-unet.safetensors", "dtype": "auto"}}
        wf["4"]["inputs"]["model"] = ["20", 0]
    elif case == "latent_stats":
        wf["20"] = {"class_type": "SDXSUNetLoader", "inputs": {"unet_name": "sdxs-stats.safetensors", "dtype": "auto"}}
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
