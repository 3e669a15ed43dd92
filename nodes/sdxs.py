"""SDXS (AiArtLab/sdxs, the MEXMA-SigLIP-conditioned UNet; not IDKiro's one-step SDXS) nodes: declarations
only; the work happens in ..waifukit (pure torch) and sdxs_host.

Node ids and widget order are public API: never rename or reorder, only append optional inputs.
"""
from __future__ import annotations

import torch


from ..waifukit import ddpm, lora
from ..waifukit.latents import batch_index_of, latent_mask
from ..waifukit.mexma.model import MISSING_PROJECTOR
from ..waifukit.registry import MODELS, fetch_hint
from ..waifukit.sdxs.unet import is_sdxs_snapshot
from . import mexma_host, sdxs_host, vae16_host, waifu_host
from .common import (BATCH_SIZE_INPUT, CATEGORY, DENOISE_INPUT, DTYPE_INPUT, LATENT_IMAGE_INPUT, RAW_LATENT_TOOLTIP,
                     TEXT_DEVICE_INPUT, WEIGHT_DTYPE_INPUT, check_inputs, check_side, diffusers_folder, diffusers_folders,
                     LoraLoaderBase, model_file, start_latent)
from .core_api import folder_paths, latent_preview, mm

SDXS_HINT = fetch_hint("sdxs")
SDXS_DEFAULTS = MODELS["sdxs"]
MAX_SIDE = 8192


class SDXSSnapshotLoader:
    DESCRIPTION = ("Loads the AiArtLab/sdxs snapshot folder (models/diffusers/sdxs): UNet, MEXMA-SigLIP text encoder "
                   "(with its projector) and the 16-channel VAE.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "snapshot": (diffusers_folders(is_sdxs_snapshot),
                         {"tooltip": "A folder under models/diffusers with unet/, text_encoder/ (+ text_projector/), "
                                     "tokenizer/, vae/ and scheduler/. " + SDXS_HINT}),
            "dtype": DTYPE_INPUT,
        }, "optional": {"text_encoder_device": TEXT_DEVICE_INPUT, "weight_dtype": WEIGHT_DTYPE_INPUT}}

    RETURN_TYPES = ("MODEL", "MEXMA_SIGLIP", "VAE")
    RETURN_NAMES = ("model", "text_encoder", "vae")
    OUTPUT_TOOLTIPS = ("The SDXS UNet (prediction type and noise schedule from scheduler/scheduler_config.json).",
                       "MEXMA-SigLIP: XLM-R tower + text projector (pooled 1152-d conditioning).",
                       "The 16-channel VAE.")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, snapshot, dtype, text_encoder_device="default", weight_dtype="default"):
        root = diffusers_folder(snapshot, is_sdxs_snapshot,
                                "SDXS snapshot (needs unet/, text_encoder/, tokenizer/, vae/, scheduler/)", SDXS_HINT)
        te = mexma_host.load_text_encoder(root, dtype, device=text_encoder_device, hint=SDXS_HINT)
        te.require_projector()  # SDXS cannot run without it: say so at load time
        return (sdxs_host.load_unet(root, dtype, weight_dtype=weight_dtype), te,
                vae16_host.load_vae(root / "vae", dtype, SDXS_HINT))


class SDXSUNetLoader:
    DESCRIPTION = ("Loads an SDXS UNet single file (diffusers UNet2DConditionModel keys) from models/diffusion_models. "
                   "Its unet/config.json must sit beside it as <name>.json and the scheduler config as "
                   "<name>.scheduler.json (the head count and noise schedule are not in the weights); the VAE's "
                   "config.json as <name>.vae.json sets the latent scaling (else 0.18215, shift 0).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet_name": (folder_paths.get_filename_list("diffusion_models"),
                          {"tooltip": "An SDXS UNet .safetensors in models/diffusion_models, with <name>.json (the "
                                      "snapshot's unet/config.json), <name>.scheduler.json and optionally "
                                      "<name>.vae.json (latent scaling) beside it."}),
            "dtype": DTYPE_INPUT,
        }, "optional": {"weight_dtype": WEIGHT_DTYPE_INPUT}}

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The SDXS UNet as a ComfyUI MODEL.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, unet_name, dtype, weight_dtype="default"):
        return (sdxs_host.load_unet(model_file("diffusion_models", unet_name, SDXS_HINT), dtype,
                                    weight_dtype=weight_dtype),)


def _check_size(name: str, value: int):
    return check_side(name, value, 8, 64, MAX_SIDE, "the VAE's 8x grid")


def _pooled(conditioning, batch: int, dim: int, which: str) -> torch.Tensor:
    """The SDXS context [B,1,dim] from a CONDITIONING: its pooled_output (MexmaSigLIPEncode with the projector)."""
    if not conditioning:
        raise ValueError(f"{which} conditioning is empty: connect a MexmaSigLIPEncode output")
    tensor, extras = conditioning[0][0], conditioning[0][1]
    pooled = extras.get("pooled_output")
    if pooled is None:
        if tensor.shape[-1] == dim and tensor.ndim == 3:  # already SDXS-shaped states from elsewhere
            pooled = tensor
        else:
            raise ValueError(f"{which} conditioning has no pooled MEXMA-SigLIP embedding: {MISSING_PROJECTOR}")
    pooled = pooled.reshape(pooled.shape[0], -1, dim) if pooled.ndim != 3 else pooled
    if pooled.shape[-1] != dim:
        raise ValueError(f"{which} conditioning is {pooled.shape[-1]}-d; this UNet needs {dim}-d (MEXMA-SigLIP pooled)")
    if pooled.shape[0] not in (1, batch):
        raise ValueError(f"{which} conditioning has batch {pooled.shape[0]}, the latent has {batch}")
    return pooled.expand(batch, -1, -1) if pooled.shape[0] == 1 else pooled


class SDXSSampler:
    DESCRIPTION = ("Samples SDXS as the reference pipeline does: CFG batch [negative, positive] and DDPM steps from "
                   "the snapshot's scheduler config. ddpm is the reference's ancestral sampler: the initial latent and "
                   "every step's noise come from one CPU generator seeded with `seed`, so a seed gives the reference "
                   "image. ddim is the deterministic alternative (eta 0) on the same schedule.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The SDXS UNet (SDXSSnapshotLoader or SDXSUNetLoader)."}),
            "positive": ("CONDITIONING", {"tooltip": "MexmaSigLIPEncode of the prompt (needs the projector)."}),
            "negative": ("CONDITIONING", {"tooltip": "MexmaSigLIPEncode of the negative prompt (\"\" by default)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                             "tooltip": "Seeds one CPU torch.Generator: the initial latent (whole batch), then each "
                                        "DDPM step's noise, in the reference pipeline's order."}),
            "steps": ("INT", {"default": SDXS_DEFAULTS["default_steps"], "min": 1, "max": 1000,
                              "tooltip": "Scheduler steps (SDXS card: 40)."}),
            "cfg": ("FLOAT", {"default": SDXS_DEFAULTS["default_cfg"], "min": 0.0, "max": 30.0, "step": 0.1,
                              "round": 0.01,
                              "tooltip": "Classifier-free guidance scale (SDXS card: 5.5; 1 skips the negative)."}),
            "width": ("INT", {"default": 576, "min": 64, "max": MAX_SIDE, "step": 8,
                              "tooltip": "Image width in pixels, a multiple of 8 (SDXS card: 576). Ignored when "
                                         "latent_image is given."}),
            "height": ("INT", {"default": 576, "min": 64, "max": MAX_SIDE, "step": 8,
                               "tooltip": "Image height in pixels, a multiple of 8 (SDXS card: 576). Ignored when "
                                          "latent_image is given."}),
            "batch_size": BATCH_SIZE_INPUT,
            "sampler": (list(ddpm.SAMPLERS), {"default": "ddpm",
                                              "tooltip": "ddpm: the reference's stochastic DDPM steps (seed-exact). "
                                                         "ddim: deterministic DDIM (eta 0) on the same schedule."}),
            "denoise": DENOISE_INPUT,
        }, "optional": {
            "latent_image": LATENT_IMAGE_INPUT,
        }}

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = (RAW_LATENT_TOOLTIP,)
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, cfg=None, denoise=None):
        return (_check_size("width", width) or _check_size("height", height)
                or check_inputs(cls, cfg=cfg, denoise=denoise))

    def sample(self, model, positive, negative, seed, steps, cfg, width, height, batch_size, sampler, denoise,
               latent_image=None):
        base = model.model
        if not isinstance(base, sdxs_host.SDXSModel):
            raise ValueError(f"SDXSSampler needs the SDXS UNet; got {type(base).__name__} (use the Waifu sampler for "
                             "Waifu models)")
        fmt = base.latent_format
        start = mask = None
        if latent_image is not None:
            shape, start = start_latent(latent_image, fmt, "SDXS")
            # As KSampler: an all-zero LATENT is an empty one, already model-space zeros (no latent shift applied).
            start = fmt.process_in(start.float()) if bool(start.any()) else start.float()
            if latent_image.get("noise_mask") is not None:  # SetLatentNoiseMask: keep the unmasked region
                mask = latent_mask(latent_image["noise_mask"], shape)
            elif denoise >= 1.0:
                start = None
        else:
            shape = (batch_size, fmt.latent_channels, height // 8, width // 8)
        unet = base.diffusion_model
        dim = unet.params.cross_attention_dim
        cond = _pooled(positive, shape[0], dim, "positive")
        uncond = _pooled(negative, shape[0], dim, "negative")
        use_cfg = cfg != 1.0
        context = torch.cat([uncond, cond]) if use_cfg else cond

        mm.load_models_gpu([model])
        device = model.load_device
        dtype = base.manual_cast_dtype or base.get_dtype()
        context = context.to(device=device, dtype=dtype)
        preview = latent_preview.prepare_callback(model, steps)

        def model_fn(x, t):
            mm.throw_exception_if_processing_interrupted()
            x_in = torch.cat([x, x]) if use_cfg else x
            t_in = torch.cat([t, t]) if use_cfg else t
            out = unet(x_in.to(dtype), t_in, context=context).float()
            if use_cfg:
                u, c = out.chunk(2)
                out = u + cfg * (c - u)
            return out

        def callback(i, x0, x_next):
            preview(i, x0, x_next, steps)

        generator = torch.Generator("cpu").manual_seed(int(seed))
        with torch.inference_mode():
            out = ddpm.sample(model_fn, base.schedule, shape, steps, generator, sampler, start=start,
                              denoise=denoise, device=device, callback=callback,
                              batch_index=batch_index_of(latent_image), mask=mask)
        # KSampler's convention: the input LATENT's other keys (noise_mask, batch_index) carry over.
        result = dict(latent_image) if latent_image is not None else {}
        result["samples"] = fmt.process_out(out).to(mm.intermediate_device())
        return (result,)


class SDXSLoraLoader(LoraLoaderBase):
    DESCRIPTION = ("Applies a LoRA to an SDXS UNet MODEL through ComfyUI's patch system, from the layouts SD-style "
                   "UNet LoRAs come in: diffusers/PEFT (unet.<module>.lora_A/lora_B, alpha from the file's "
                   "metadata), diffusers' older attention-processor files (processor.to_q_lora.down/up), kohya "
                   "(lora_unet_..., .alpha) or ComfyUI's (diffusion_model.<key>). Keys that match nothing are named "
                   "in a warning.")
    MODEL_WHAT = "An SDXS UNet"

    def check_model(self, model):
        if not isinstance(model.model, sdxs_host.SDXSModel):
            raise ValueError(f"SDXSLoraLoader needs the SDXS UNet; got {type(model.model).__name__} (use "
                             "LinearDiTLoraLoader for Waifu models)")

    def apply(self, model, path, strength):
        return waifu_host.apply_lora(model, path, strength, key_map=lora.unet_key_map, what="SDXS UNet",
                                     kind="LoRA for the SDXS UNet", component="unet")


NODES = {
    "SDXSSnapshotLoader": (SDXSSnapshotLoader, "Load SDXS Snapshot (AiArtLab, diffusers folder)"),
    "SDXSUNetLoader": (SDXSUNetLoader, "Load SDXS UNet (AiArtLab)"),
    "SDXSSampler": (SDXSSampler, "SDXS Sampler (DDPM / DDIM)"),
    "SDXSLoraLoader": (SDXSLoraLoader, "Load SDXS LoRA (diffusers / kohya / ComfyUI)"),
}
