"""Waifu nodes: declarations only; the work happens in ..waifukit (pure torch) and the *_host glue.

Node ids and widget order are public API (saved workflows store widget values by position): never rename
or reorder, only append optional inputs.
"""
from __future__ import annotations

import logging

import torch

from ..waifukit.flow import flow_sigmas
from ..kernels.fused import sample_flow_euler_fast
from ..waifukit.latents import batch_index_of, latent_mask, seeded_noise
from ..waifukit.loading import is_waifu_snapshot
from ..waifukit.registry import FETCH_HINT, MODELS, WAIFU_BUCKETS, bucket_label
from . import mexma_host, vae16_host, waifu_host
from .common import (BATCH_SIZE_INPUT, CATEGORY, DENOISE_INPUT, DTYPE_INPUT, LATENT_IMAGE_INPUT, RAW_LATENT_TOOLTIP,
                     TEXT_DEVICE_INPUT, WEIGHT_DTYPE_INPUT, check_inputs, check_side, diffusers_folder, diffusers_folders,
                     LoraLoaderBase, model_file, start_latent)
from .core_api import folder_paths, latent_preview, mm, sample_custom, sampler_object

WAIFU_DEFAULTS = MODELS["waifu-2b"]
MAX_SIDE = 8192


class WaifuSnapshotLoader:
    DESCRIPTION = "Loads the AiArtLab/waifu-2b snapshot folder (models/diffusers/waifu-2b): DiT, text encoder, VAE."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "snapshot": (diffusers_folders(is_waifu_snapshot),
                         {"tooltip": "A folder under models/diffusers with transformer/, text_encoder/, tokenizer/, "
                                     "vae/ and scheduler/. " + FETCH_HINT}),
            "dtype": DTYPE_INPUT,
        }, "optional": {"text_encoder_device": TEXT_DEVICE_INPUT, "weight_dtype": WEIGHT_DTYPE_INPUT}}

    RETURN_TYPES = ("MODEL", "MEXMA_SIGLIP", "VAE")
    RETURN_NAMES = ("model", "text_encoder", "vae")
    OUTPUT_TOOLTIPS = ("The Linear DiT with flow sampling (shift from the snapshot's scheduler config).",
                       "The MEXMA-SigLIP text tower (XLM-R) and its tokenizer.",
                       "The AuraDiffusion 16-channel VAE.")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, snapshot, dtype, text_encoder_device="default", weight_dtype="default"):
        root = diffusers_folder(snapshot, is_waifu_snapshot,
                                "Waifu snapshot (needs transformer/, text_encoder/, tokenizer/, vae/, scheduler/)")
        return (waifu_host.load_dit(root, dtype, weight_dtype=weight_dtype),
                mexma_host.load_text_encoder(root, dtype, device=text_encoder_device, hint=FETCH_HINT),
                vae16_host.load_vae(root / "vae", dtype))


class LinearDiTLoader:
    DESCRIPTION = "Loads a Waifu/Sana Linear DiT single file (diffusers or original Sana keys) as a MODEL."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet_name": (folder_paths.get_filename_list("diffusion_models"),
                          {"tooltip": "A file in models/diffusion_models: the waifu-2b transformer "
                                      "(.safetensors) or an original Sana-layout checkpoint (.safetensors or .pth)."}),
            "dtype": DTYPE_INPUT,
        }, "optional": {"weight_dtype": WEIGHT_DTYPE_INPUT}}

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The Linear DiT with flow sampling (shift 3.0 unless a sampler overrides it).",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, unet_name, dtype, weight_dtype="default"):
        return (waifu_host.load_dit(model_file("diffusion_models", unet_name), dtype, weight_dtype=weight_dtype),)


def _check_size(name: str, value: int):
    return check_side(name, value, 64, 64, MAX_SIDE, "Waifu's patch grid")


def _cond(conditioning, batch: int, which: str):
    if not conditioning:
        raise ValueError(f"{which} conditioning is empty: connect a MexmaSigLIPEncode output")
    tensor, extras = conditioning[0][0], conditioning[0][1]
    mask = extras.get("attention_mask")
    if tensor.ndim != 3:
        raise ValueError(f"{which} conditioning has shape {tuple(tensor.shape)}; expected per-token states [B,L,D] "
                         "from MexmaSigLIPEncode")
    if mask is None:
        mask = torch.ones(tensor.shape[:2], dtype=torch.long)
    if tensor.shape[0] not in (1, batch):
        raise ValueError(f"{which} conditioning has batch {tensor.shape[0]}, the latent has {batch}")
    if tensor.shape[0] == 1 and batch > 1:
        tensor, mask = tensor.expand(batch, -1, -1), mask.expand(batch, -1)
    return tensor, mask


class LinearDiTSampler:
    DESCRIPTION = ("Samples Waifu with flow-Euler exactly as the reference pipeline (diffusers' FlowMatchEuler "
                   "schedule, CFG batch [negative, positive]). Seeds match the reference: the initial noise is drawn "
                   "on the CPU for the whole batch.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A Waifu Linear DiT."}),
            "positive": ("CONDITIONING", {"tooltip": "MexmaSigLIPEncode of the prompt."}),
            "negative": ("CONDITIONING", {"tooltip": "MexmaSigLIPEncode of the negative prompt (\"\" by default)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                             "tooltip": "torch.randn on a CPU generator seeded with this, whole batch at once."}),
            "steps": ("INT", {"default": WAIFU_DEFAULTS["default_steps"], "min": 1, "max": 1000,
                              "tooltip": "Euler steps (Waifu default 20)."}),
            "cfg": ("FLOAT", {"default": WAIFU_DEFAULTS["default_cfg"], "min": 0.0, "max": 30.0, "step": 0.1,
                              "round": 0.01,
                              "tooltip": "Classifier-free guidance scale (Waifu default 4.5; 1 skips the negative)."}),
            "width": ("INT", {"default": 512, "min": 64, "max": MAX_SIDE, "step": 64,
                              "tooltip": "Image width in pixels, a multiple of 64. Ignored when latent_image is given."}),
            "height": ("INT", {"default": 512, "min": 64, "max": MAX_SIDE, "step": 64,
                               "tooltip": "Image height in pixels, a multiple of 64. Ignored when latent_image is given."}),
            "batch_size": BATCH_SIZE_INPUT,
            "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.05,
                                "tooltip": "Flow shift of the sigma schedule. 0 = the checkpoint's own "
                                           "(scheduler_config.json; 3.0 for waifu-2b)."}),
            "denoise": DENOISE_INPUT,
        }, "optional": {
            "latent_image": LATENT_IMAGE_INPUT,
        }}

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = (RAW_LATENT_TOOLTIP,)
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, cfg=None, shift=None, denoise=None):
        # Naming an input here turns off ComfyUI's own range check for it: _check_size and check_inputs do it.
        # None: a link, or a value missing from the prompt (ComfyUI reports that itself).
        return (_check_size("width", width) or _check_size("height", height)
                or check_inputs(cls, cfg=cfg, shift=shift, denoise=denoise))

    def sample(self, model, positive, negative, seed, steps, cfg, width, height, batch_size, shift, denoise,
               latent_image=None):
        base = model.model
        fmt = base.latent_format
        start = mask = None
        if latent_image is not None:
            shape, start = start_latent(latent_image, fmt, "Waifu")
            if latent_image.get("noise_mask") is not None:
                mask = latent_mask(latent_image["noise_mask"], shape)
        else:
            shape = (batch_size, fmt.latent_channels, height // 8, width // 8)
        # The model sampling as KSampler reads it: a ModelSamplingSD3 / ModelSamplingAuraFlow patch on the
        # MODEL replaces the base one (shift, and the multiplier that turns sigma into the DiT's timestep).
        sampling = model.get_model_object("model_sampling")
        sigmas = flow_sigmas(steps, shift or float(sampling.shift), denoise=denoise)
        noise = seeded_noise(shape, seed, batch_index_of(latent_image))
        preview = latent_preview.prepare_callback(model, steps)

        unsupported = waifu_host.unsupported_patches(model)
        if unsupported:
            # ComfyUI's own sampler loop honours every patch; ours would silently skip them.
            logging.warning("comfyui-waifu: LinearDiTSampler: the MODEL carries %s, which the fused flow-Euler loop "
                            "cannot apply; sampling with ComfyUI's euler sampler on the same sigmas instead",
                            ", ".join(unsupported))
            raw = start if start is not None else torch.zeros(shape)
            out = sample_custom(model, noise, cfg, sampler_object("euler"), sigmas, positive, negative, raw,
                                noise_mask=latent_image.get("noise_mask") if latent_image is not None else None,
                                callback=preview, disable_pbar=True, seed=seed)
            return (_latent_out(latent_image, out.to(mm.intermediate_device())),)

        start_in = None if start is None else fmt.process_in(start.float())
        x = noise if start_in is None or sigmas[0] == 1.0 else sigmas[0] * noise + (1 - sigmas[0]) * start_in
        inpaint = None if mask is None else (mask, noise, start_in)

        cond, cond_mask = _cond(positive, shape[0], "positive")
        uncond, uncond_mask = _cond(negative, shape[0], "negative")

        mm.load_models_gpu([model])
        device = model.load_device
        dit = base.diffusion_model
        dtype = base.manual_cast_dtype or base.get_dtype()

        def callback(i, x0, x_next):
            preview(i, x0, x_next, steps)

        # The fused loop (text K/V once per image, padded tokens trimmed, sync-free CFG+Euler, Triton on CUDA) is
        # tested to give the eager sampler's latents; WAIFU_KERNELS=eager forces the eager kernels.
        with torch.inference_mode():
            out = sample_flow_euler_fast(dit, x.to(device), sigmas.to(device), cond.to(device), cond_mask.to(device),
                                         uncond.to(device), uncond_mask.to(device), cfg, callback,
                                         interrupt=mm.throw_exception_if_processing_interrupted, dtype=dtype,
                                         inpaint=inpaint, timestep_scale=float(sampling.multiplier))
        return (_latent_out(latent_image, fmt.process_out(out).to(mm.intermediate_device())),)


def _latent_out(latent_image, samples):
    """KSampler's output convention: the input LATENT's other keys (noise_mask, batch_index) carried over."""
    out = dict(latent_image) if latent_image is not None else {}
    out["samples"] = samples
    return out


class LinearDiTLoraLoader(LoraLoaderBase):
    DESCRIPTION = ("Applies a LoRA to a Waifu/Sana Linear DiT MODEL through ComfyUI's patch system, from any of "
                   "the layouts Sana LoRAs come in: diffusers/PEFT (train_dreambooth_lora_sana.py, SimpleTuner, "
                   "ai-toolkit), kohya (lora_unet_..., .alpha) or ComfyUI's (diffusion_model.<key>). Split q/k/v "
                   "map into our fused projections. Keys that match nothing are named in a warning.")
    MODEL_WHAT = "A Waifu Linear DiT"

    def apply(self, model, path, strength):
        return waifu_host.apply_lora(model, path, strength)


class WaifuEmptyLatent:
    DESCRIPTION = "An empty 16-channel latent at one of Waifu's 64-px aspect buckets (sides 384-768)."
    _LABELS = [bucket_label(w, h) for w, h in WAIFU_BUCKETS]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "bucket": (cls._LABELS, {"default": bucket_label(512, 512),
                                     "tooltip": "Width x height; Waifu trained on these 64-px buckets."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Images per run."}),
        }}

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Zeros [B,16,H/8,W/8]; connect to LinearDiTSampler's latent_image (or KSampler).",)
    FUNCTION = "generate"
    CATEGORY = CATEGORY

    def generate(self, bucket, batch_size):
        w, h = WAIFU_BUCKETS[self._LABELS.index(bucket)]
        return ({"samples": torch.zeros([batch_size, 16, h // 8, w // 8], device=mm.intermediate_device())},)


NODES = {
    "WaifuSnapshotLoader": (WaifuSnapshotLoader, "Load Waifu Snapshot (diffusers folder)"),
    "LinearDiTLoader": (LinearDiTLoader, "Load Linear DiT (Waifu)"),
    "LinearDiTSampler": (LinearDiTSampler, "Linear DiT Sampler (flow-Euler)"),
    "WaifuEmptyLatent": (WaifuEmptyLatent, "Empty Waifu Latent (aspect buckets)"),
    "LinearDiTLoraLoader": (LinearDiTLoraLoader, "Load LoRA (Linear DiT / Waifu)"),
}
