"""Würstchen v2 nodes (Stage C -> Stage B -> Stage A): declarations only; the work happens in ..waifukit and
wuerstchen_host.

Node ids and widget order are public API (saved workflows store widget values by position): never rename
or reorder, only append optional inputs.
"""
from __future__ import annotations

from math import ceil
from pathlib import Path

import torch


from ..waifukit.registry import MODELS, fetch_hint
from ..waifukit.wuerstchen.sched import SCHEDULES, timesteps
from . import wuerstchen_host as host
from .common import CATEGORY, DTYPE_INPUT, check_inputs, check_side, clean_text, diffusers_folder, diffusers_folders, model_file
from .core_api import folder_paths

PRIOR_HINT = fetch_hint("wuerstchen-prior")
DECODER_HINT = fetch_hint("wuerstchen")
PRIOR_DEFAULTS = MODELS["wuerstchen-prior"]
DECODER_DEFAULTS = MODELS["wuerstchen"]
MAX_SIDE = 4096
SIDE_STEP = 128  # sizes the reference round-trips exactly through Stage C -> Stage B: Stage C takes ceil(side / 42.67),
# Stage B int(that * 10.67) = side / 4, a multiple of 16 (resolution_multiple and latent_dim_scale in the
# model_index.json of huggingface.co/warp-ai/wuerstchen-prior and warp-ai/wuerstchen).
DTYPE_STAGE = (DTYPE_INPUT[0], {"default": "auto", "tooltip": "Weight/compute dtype. auto: fp32 on CPU; bf16 on GPUs "
                                "that support it, else fp32 (fp16 is not picked automatically: it breaks Stable "
                                "Cascade's Stage C and is unverified for v2)."})


def is_prior_snapshot(folder: Path) -> bool:
    return (folder / "prior").is_dir() and (folder / "text_encoder").is_dir()


def is_decoder_snapshot(folder: Path) -> bool:
    return all((folder / sub).is_dir() for sub in ("decoder", "vqgan", "text_encoder"))


class WuerstchenPriorLoader:
    DESCRIPTION = "Loads the warp-ai/wuerstchen-prior snapshot folder (models/diffusers/wuerstchen-prior): Stage C + CLIP-bigG."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "snapshot": (diffusers_folders(is_prior_snapshot),
                         {"tooltip": "A folder under models/diffusers with prior/, text_encoder/, tokenizer/ and "
                                     "scheduler/ (warp-ai/wuerstchen-prior). " + PRIOR_HINT}),
            "dtype": DTYPE_STAGE,
        }}

    RETURN_TYPES = ("WUERSTCHEN_PRIOR", "WUERSTCHEN_CLIP")
    RETURN_NAMES = ("prior", "clip")
    OUTPUT_TOOLTIPS = ("Stage C, the text-conditional prior.", "The prior's CLIP-bigG text encoder and tokenizer.")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, snapshot, dtype):
        root = diffusers_folder(snapshot, is_prior_snapshot, "Würstchen prior snapshot (needs prior/, text_encoder/, "
                                "tokenizer/)", PRIOR_HINT)
        return host.load_prior(root / "prior", dtype), host.load_clip(root / "text_encoder", "prior", dtype)


class WuerstchenDecoderLoader:
    DESCRIPTION = ("Loads the warp-ai/wuerstchen snapshot folder (models/diffusers/wuerstchen): Stage B, CLIP-H and "
                   "the Stage A VQGAN.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "snapshot": (diffusers_folders(is_decoder_snapshot),
                         {"tooltip": "A folder under models/diffusers with decoder/, vqgan/, text_encoder/, tokenizer/ "
                                     "and scheduler/ (warp-ai/wuerstchen). " + DECODER_HINT}),
            "dtype": DTYPE_STAGE,
        }}

    RETURN_TYPES = ("WUERSTCHEN_DECODER", "WUERSTCHEN_CLIP", "VAE")
    RETURN_NAMES = ("decoder", "clip", "vqgan")
    OUTPUT_TOOLTIPS = ("Stage B, the decoder.", "The decoder's CLIP-H text encoder and tokenizer.",
                       "Stage A, the Paella VQGAN (a VAE: also works with the stock VAEDecode/VAEEncode).")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, snapshot, dtype):
        root = diffusers_folder(snapshot, is_decoder_snapshot, "Würstchen decoder snapshot (needs decoder/, vqgan/, "
                                "text_encoder/, tokenizer/)", DECODER_HINT)
        decoder, vqgan = host.load_decoder(root / "decoder", dtype), host.load_vqgan(root / "vqgan", dtype)
        host.attach_previews(decoder, vqgan)
        return decoder, host.load_clip(root / "text_encoder", "decoder", dtype), vqgan


class WuerstchenStageCLoader:
    DESCRIPTION = ("Loads a Würstchen v2 Stage C (prior) single file from models/diffusion_models. Its config must sit "
                   "beside it as <name>.json (warp-ai/wuerstchen-prior prior/config.json renamed): the head count "
                   "is not in the weights. Pipeline constants and noise schedule: the published defaults.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet_name": (folder_paths.get_filename_list("diffusion_models"),
                          {"tooltip": "A Stage C file in models/diffusion_models (diffusers keys, or the original "
                                      "checkpoint's in_proj attention keys), with prior/config.json of "
                                      "warp-ai/wuerstchen-prior beside it as <name>.json."}),
            "dtype": DTYPE_STAGE,
        }}

    RETURN_TYPES = ("WUERSTCHEN_PRIOR",)
    RETURN_NAMES = ("prior",)
    OUTPUT_TOOLTIPS = ("Stage C, the text-conditional prior.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, unet_name, dtype):
        return (host.load_prior(model_file("diffusion_models", unet_name, PRIOR_HINT), dtype),)


class WuerstchenStageBLoader:
    DESCRIPTION = ("Loads a Würstchen v2 Stage B (decoder) single file from models/diffusion_models. Its config must "
                   "sit beside it as <name>.json (warp-ai/wuerstchen decoder/config.json renamed): head counts and "
                   "the block pattern are not in the weights.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet_name": (folder_paths.get_filename_list("diffusion_models"),
                          {"tooltip": "A Stage B file in models/diffusion_models (diffusers keys), with "
                                      "decoder/config.json of warp-ai/wuerstchen beside it as <name>.json."}),
            "dtype": DTYPE_STAGE,
        }}

    RETURN_TYPES = ("WUERSTCHEN_DECODER",)
    RETURN_NAMES = ("decoder",)
    OUTPUT_TOOLTIPS = ("Stage B, the decoder.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, unet_name, dtype):
        return (host.load_decoder(model_file("diffusion_models", unet_name, DECODER_HINT), dtype),)


class WuerstchenStageALoader:
    DESCRIPTION = ("Loads the Würstchen v2 Stage A (Paella VQGAN) single file from models/vae, with its config beside "
                   "it as <name>.json (warp-ai/wuerstchen vqgan/config.json renamed): the latent scale is not in "
                   "the weights.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (folder_paths.get_filename_list("vae"),
                         {"tooltip": "The vqgan/ weights of warp-ai/wuerstchen in models/vae, with vqgan/config.json "
                                     "beside it as <name>.json (it sets the scale factor, 0.3764 as published)."}),
            "dtype": DTYPE_INPUT,
        }}

    RETURN_TYPES = ("VAE",)
    RETURN_NAMES = ("vqgan",)
    OUTPUT_TOOLTIPS = ("Stage A as a VAE (stock VAEDecode/VAEEncode work on Stage B latents).",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, vae_name, dtype):
        return (host.load_vqgan(model_file("vae", vae_name, DECODER_HINT), dtype),)


class WuerstchenTextEncode:
    DESCRIPTION = ("Encodes a prompt with a Würstchen CLIP text tower: last_hidden_state [1,77,D] with the attention "
                   "mask applied, as the reference pipelines do. Use the prior's CLIP for Stage C and the decoder's "
                   "for Stage B.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("WUERSTCHEN_CLIP", {"tooltip": "From WuerstchenPriorLoader (for Stage C) or "
                                                    "WuerstchenDecoderLoader (for Stage B)."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                "tooltip": "The prompt (77 CLIP tokens at most; longer prompts are truncated). Empty is "
                                           "valid: the reference's negative prompt is \"\"."}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("Per-token CLIP states [1,77,D] for WuerstchenStageC / WuerstchenStageB.",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, clip, text):
        hidden = clip.encode([clean_text(text)])
        return ([[hidden, {"wuerstchen_clip": clip.role, "wuerstchen_clip_width": clip.width}]],)


def _check_size(name: str, value: int):
    return check_side(name, value, SIDE_STEP, SIDE_STEP, MAX_SIDE,
                      "the sizes Würstchen's Stage C -> Stage B -> Stage A chain reproduces exactly")


def _text(conditioning, batch: int, width: int, which: str, stage: str, clip_from: str) -> torch.Tensor:
    if not conditioning:
        raise ValueError(f"{stage}: {which} conditioning is empty; connect a WuerstchenTextEncode output")
    tensor = conditioning[0][0]
    if tensor.ndim != 3 or tensor.shape[-1] != width:
        raise ValueError(f"{stage}: {which} conditioning has shape {tuple(tensor.shape)}, this model needs per-token "
                         f"CLIP states [1,77,{width}]: encode it with the CLIP from {clip_from}")
    if tensor.shape[0] not in (1, batch):
        raise ValueError(f"{stage}: {which} conditioning has batch {tensor.shape[0]}, the latents have {batch}")
    return tensor.expand(batch, -1, -1) if tensor.shape[0] == 1 else tensor


class WuerstchenStageC:
    DESCRIPTION = ("Stage C: samples the 16-channel image embeddings from text, exactly like diffusers' "
                   "WuerstchenPriorPipeline (DDPM-Würstchen, CFG batch [positive, negative] with lerp, noise from a CPU "
                   "generator seeded with `seed`). Output is de-normalised (x*42-1) for Stage B.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "prior": ("WUERSTCHEN_PRIOR", {"tooltip": "Stage C from WuerstchenPriorLoader or WuerstchenStageCLoader."}),
            "positive": ("CONDITIONING", {"tooltip": "WuerstchenTextEncode of the prompt with the prior's CLIP."}),
            "negative": ("CONDITIONING", {"tooltip": "WuerstchenTextEncode of the negative prompt (\"\" by default) "
                                                     "with the prior's CLIP. Unused when cfg <= 1."}),
            "width": ("INT", {"default": 1024, "min": SIDE_STEP, "max": MAX_SIDE, "step": SIDE_STEP,
                              "tooltip": "Image width in pixels, a multiple of 128 (Würstchen v2 trained at 1024-1536)."}),
            "height": ("INT", {"default": 1024, "min": SIDE_STEP, "max": MAX_SIDE, "step": SIDE_STEP,
                               "tooltip": "Image height in pixels, a multiple of 128."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Images per run."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                             "tooltip": "Seeds a CPU torch.Generator for the initial noise and every step's noise, "
                                        "drawn in the reference pipeline's order (same seed = same image as diffusers)."}),
            "steps": ("INT", {"default": PRIOR_DEFAULTS["default_steps"], "min": 1, "max": 1000,
                              "tooltip": "Model calls. With schedule wuerstchen_default, 29 is exactly diffusers' "
                                         "DEFAULT_STAGE_C_TIMESTEPS (20 steps 1 -> 2/3, then 10 steps to 0)."}),
            "schedule": (list(SCHEDULES), {"default": "wuerstchen_default",
                                           "tooltip": "wuerstchen_default: 2/3 of the steps above t=2/3, as the "
                                                      "reference's DEFAULT_STAGE_C_TIMESTEPS. linear: evenly from 1 to 0 "
                                                      "(the pipeline's num_inference_steps)."}),
            "cfg": ("FLOAT", {"default": PRIOR_DEFAULTS["default_cfg"], "min": 0.0, "max": 30.0, "step": 0.1,
                              "round": 0.01,
                              "tooltip": "Prior guidance (reference 4.0). At 1 or below the negative is not used."}),
        }}

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("embeddings",)
    OUTPUT_TOOLTIPS = ("Stage C image embeddings [B,16,ceil(H/42.67),ceil(W/42.67)] for WuerstchenStageB.",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, cfg=None):
        return _check_size("width", width) or _check_size("height", height) or check_inputs(cls, cfg=cfg)

    def sample(self, prior, positive, negative, width, height, batch_size, seed, steps, schedule, cfg):
        for name, value in (("width", width), ("height", height)):
            err = _check_size(name, value)
            if err:
                raise ValueError(err)
        p = prior.params
        where = "WuerstchenPriorLoader (CLIP-bigG)"
        cond = _text(positive, batch_size, p.c_cond, "positive", "Stage C", where)
        uncond = _text(negative, batch_size, p.c_cond, "negative", "Stage C", where) if cfg > 1 else None
        shape = (batch_size, p.c_in, ceil(height / p.resolution_multiple), ceil(width / p.resolution_multiple))
        x = host.run_stage(prior, shape, cond, uncond, timesteps(steps, schedule), seed, cfg)
        return ({"samples": x * p.latent_mean - p.latent_std, "wuerstchen_image_size": [height, width]},)


class WuerstchenStageB:
    DESCRIPTION = ("Stage B: decodes Stage C embeddings to 4-channel VQGAN latents (H/4 x W/4), exactly like diffusers' "
                   "WuerstchenDecoderPipeline (reference: 12 steps, guidance 0).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "decoder": ("WUERSTCHEN_DECODER", {"tooltip": "Stage B from WuerstchenDecoderLoader or WuerstchenStageBLoader."}),
            "embeddings": ("LATENT", {"tooltip": "The output of WuerstchenStageC."}),
            "positive": ("CONDITIONING", {"tooltip": "WuerstchenTextEncode of the prompt with the decoder's CLIP."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                             "tooltip": "Seeds this stage's own CPU generator (initial noise, then every step's noise)."}),
            "steps": ("INT", {"default": DECODER_DEFAULTS["default_steps"], "min": 1, "max": 1000,
                              "tooltip": "Steps, evenly from t=1 to 0 (reference 12)."}),
            "cfg": ("FLOAT", {"default": DECODER_DEFAULTS["default_cfg"], "min": 0.0, "max": 30.0, "step": 0.1,
                              "round": 0.01,
                              "tooltip": "Decoder guidance (reference 0: off). Above 1 it needs `negative`; the "
                                         "unconditional branch gets zero embeddings, as in the reference."}),
        }, "optional": {
            "negative": ("CONDITIONING", {"tooltip": "WuerstchenTextEncode of the negative prompt with the decoder's "
                                                     "CLIP; only used when cfg > 1."}),
        }}

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Stage B latents [B,4,H/4,W/4] for WuerstchenStageA (or VAEDecode with the VQGAN).",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, cfg=None):
        return check_inputs(cls, cfg=cfg)

    def sample(self, decoder, embeddings, positive, seed, steps, cfg, negative=None):
        p = decoder.params
        emb = embeddings["samples"]
        if emb.ndim != 4 or emb.shape[1] != p.effnet_embd:
            raise ValueError(f"Stage B: embeddings have shape {tuple(emb.shape)}; they must be WuerstchenStageC's output "
                             f"[B,{p.effnet_embd},h,w] (an ordinary {emb.shape[1] if emb.ndim == 4 else '?'}-channel "
                             "latent is not Stage C embeddings)")
        b, _, h, w = emb.shape
        lh, lw = int(h * p.latent_dim_scale), int(w * p.latent_dim_scale)
        requested = embeddings.get("wuerstchen_image_size")
        if requested is not None and [lh * 4, lw * 4] != list(requested):
            raise ValueError(f"Stage B: the embeddings are {h}x{w}, which decode to a {lw * 4}x{lh * 4} image, but Stage C "
                             f"made them for {requested[1]}x{requested[0]}: they were resized or replaced after Stage C. "
                             f"Run WuerstchenStageC at the size you want instead")
        m = p.size_multiple
        if lh % m or lw % m:
            raise ValueError(f"Stage B: embeddings {h}x{w} give a {lh}x{lw} latent, but this decoder needs sides that are "
                             f"multiples of {m}; make them with WuerstchenStageC at a width/height that is a multiple of "
                             f"{SIDE_STEP}")
        where = "WuerstchenDecoderLoader (CLIP-H)"
        cond = _text(positive, b, p.clip_embd, "positive", "Stage B", where)
        uncond = None
        if cfg > 1:
            if negative is None:
                raise ValueError("Stage B: cfg > 1 needs a negative conditioning (WuerstchenTextEncode of \"\" with the "
                                 "decoder's CLIP); the reference decoder runs without guidance (cfg 0)")
            uncond = _text(negative, b, p.clip_embd, "negative", "Stage B", where)
        x = host.run_stage(decoder, (b, p.c_in, lh, lw), cond, uncond, timesteps(steps, "linear"), seed, cfg,
                           effnet=emb.float())
        return ({"samples": x},)


class WuerstchenStageA:
    DESCRIPTION = "Stage A: the Paella VQGAN decodes Stage B latents (times its 0.3764 scale) to pixels, clamped to [0,1]."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT", {"tooltip": "The output of WuerstchenStageB."}),
            "vqgan": ("VAE", {"tooltip": "The VQGAN from WuerstchenDecoderLoader or WuerstchenStageALoader."}),
        }}

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded images.",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY

    def decode(self, samples, vqgan):
        if not isinstance(vqgan, host.WuerstchenVQGAN):
            raise ValueError("Stage A needs the Würstchen VQGAN (WuerstchenDecoderLoader's vqgan output or "
                             "WuerstchenStageALoader), not another VAE")
        return (vqgan.decode(samples["samples"]),)


NODES = {
    "WuerstchenPriorLoader": (WuerstchenPriorLoader, "Load Würstchen Prior (Stage C snapshot)"),
    "WuerstchenDecoderLoader": (WuerstchenDecoderLoader, "Load Würstchen Decoder (Stage B + A snapshot)"),
    "WuerstchenStageCLoader": (WuerstchenStageCLoader, "Load Würstchen Stage C (file)"),
    "WuerstchenStageBLoader": (WuerstchenStageBLoader, "Load Würstchen Stage B (file)"),
    "WuerstchenStageALoader": (WuerstchenStageALoader, "Load Würstchen Stage A VQGAN (file)"),
    "WuerstchenTextEncode": (WuerstchenTextEncode, "Würstchen CLIP Text Encode"),
    "WuerstchenStageC": (WuerstchenStageC, "Würstchen Stage C (prior sampler)"),
    "WuerstchenStageB": (WuerstchenStageB, "Würstchen Stage B (decoder sampler)"),
    "WuerstchenStageA": (WuerstchenStageA, "Würstchen Stage A (VQGAN decode)"),
}
