"""ComfyUI glue for the 16-channel VAE: a ``comfy.sd.VAE`` whose ``first_stage_model`` is our native
AutoencoderKL, so stock VAEDecode / VAEEncode accept it."""
from __future__ import annotations

from pathlib import Path

import torch

import json
import logging
import os

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import folder_paths

from ..waifukit import loading
from ..waifukit.preview import fit_latent_rgb
from ..waifukit.vae import AutoencoderKL
from .common import pick_dtype


class AuraVAE(comfy.sd.VAE):
    """comfy.sd.VAE around the native AutoencoderKL, set up the way core sets up a KL VAE, without core's
    key sniffing (which always builds a mid-block attention the 16ch VAE may not have)."""

    WORKING_DTYPES = [torch.bfloat16, torch.float32]

    def __init__(self, module: AutoencoderKL, latent_channels: int, source: Path, dtype):
        self.memory_used_encode = lambda shape, dtype: 1767 * shape[2] * shape[3] * mm.dtype_size(dtype)
        self.memory_used_decode = lambda shape, dtype: 2178 * shape[2] * shape[3] * 64 * mm.dtype_size(dtype)
        self.downscale_ratio = 8
        self.upscale_ratio = 8
        self.latent_channels = latent_channels
        self.latent_dim = 2
        self.output_channels = 3
        self.process_input = lambda image: image * 2.0 - 1.0
        self.process_output = lambda image: torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0)
        self.working_dtypes = self.WORKING_DTYPES
        self.disable_offload = False
        self.not_video = False
        self.size = None
        self.downscale_index_formula = None
        self.upscale_index_formula = None
        self.extra_1d_channel = None
        self.crop_input = True
        self.first_stage_model = module.eval()
        self.device = mm.vae_device()
        offload_device = mm.vae_offload_device()
        self.vae_dtype = dtype
        self.first_stage_model.to(self.vae_dtype)
        self.output_device = mm.intermediate_device()
        self.patcher = comfy.model_patcher.ModelPatcher(self.first_stage_model, load_device=self.device,
                                                        offload_device=offload_device)
        self.source = source
        self.model_size()

    def decode(self, samples_in, vae_options={}):
        out = super().decode(samples_in, vae_options)
        if self.vae_dtype == torch.float16 and torch.isnan(out).any():
            # fp16 activations of the 16ch VAE can overflow on some latents: redo this decode in fp32.
            logging.warning("comfyui-waifu: fp16 VAE decode overflowed (NaN); decoding again in fp32")
            self.vae_dtype = torch.float32
            self.first_stage_model.to(torch.float32)
            try:
                out = super().decode(samples_in, vae_options)
            finally:
                self.vae_dtype = torch.float16
                self.first_stage_model.to(torch.float16)
        return out


# Preview factors per VAE file, fitted once and kept in the user directory (research: no peer has previews).
PREVIEW_FACTORS: dict = {}


def _preview_cache_path() -> str:
    return os.path.join(folder_paths.get_user_directory(), "comfyui-waifu", "latent_rgb_factors.json")


def preview_factors(vae: AuraVAE, params) -> dict:
    """{"factors", "bias"} mapping model-space latents to preview RGB, derived from this VAE file."""
    st = os.stat(vae.source)
    key = f"{os.path.abspath(vae.source)}|{st.st_size}|{int(st.st_mtime)}"
    path = _preview_cache_path()
    try:
        cache = json.loads(open(path).read())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        module = vae.first_stage_model
        device = next(module.parameters()).device
        factors, bias = fit_latent_rgb(module.decode, params.latent_channels, params.scaling_factor,
                                       params.shift_factor or 0.0, device=device, dtype=vae.vae_dtype)
        cache[key] = {"factors": factors, "bias": bias}
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump(cache, f)
            os.replace(path + ".tmp", path)
        except OSError as e:  # a read-only user dir only costs a refit next time
            logging.info("comfyui-waifu: could not cache preview factors: %s", e)
    PREVIEW_FACTORS["aura16"] = cache[key]
    return cache[key]


def load_vae(path: Path, dtype_choice: str = "auto") -> AuraVAE:
    res = loading.resolve_vae(path)
    module = AutoencoderKL(res.params, dtype=torch.float32)
    loading.load_strict(module, res.state_dict, res.source)
    device = mm.vae_device()
    dtype = pick_dtype(dtype_choice, device, lambda: mm.vae_dtype(device, AuraVAE.WORKING_DTYPES))
    vae = AuraVAE(module, res.params.latent_channels, res.source, dtype)
    try:
        preview_factors(vae, res.params)
    except Exception as e:  # previews are a convenience; never fail a load over them
        logging.warning("comfyui-waifu: no latent preview factors for %s: %s", res.source, e)
    return vae
