"""AuraDiffusion 16-channel VAE nodes (declarations only)."""
from __future__ import annotations

import folder_paths

from . import vae16_host
from .common import CATEGORY, DTYPE_INPUT, model_file


class AuraVAE16Loader:
    DESCRIPTION = "Loads the AuraDiffusion 16-channel VAE (diffusers or LDM keys) from models/vae."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (folder_paths.get_filename_list("vae"),
                         {"tooltip": "A 16-channel AutoencoderKL file in models/vae "
                                     "(e.g. AuraDiffusion/16ch-vae diffusion_pytorch_model.safetensors)."}),
            "dtype": DTYPE_INPUT,
        }}

    RETURN_TYPES = ("VAE",)
    OUTPUT_TOOLTIPS = ("A ComfyUI VAE: works with AuraVAE16Decode and with the stock VAEDecode/VAEEncode.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, vae_name, dtype):
        return (vae16_host.load_vae(model_file("vae", vae_name), dtype),)


class AuraVAE16Decode:
    DESCRIPTION = "Decodes raw 16-channel latents with the AuraDiffusion VAE (no extra scaling: LATENT is raw)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT", {"tooltip": "Raw 16-channel latents, e.g. from LinearDiTSampler."}),
            "vae": ("VAE", {"tooltip": "The 16-channel VAE (snapshot loader or AuraVAE16Loader)."}),
        }}

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("Images [B,H,W,3] in 0..1.",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY

    def decode(self, samples, vae):
        z = samples["samples"]
        if z.ndim != 4 or z.shape[1] != vae.latent_channels:
            raise ValueError(f"latent has shape {tuple(z.shape)}; this VAE decodes {vae.latent_channels}-channel "
                             "latents [B,C,H/8,W/8]")
        return (vae.decode(z),)


NODES = {
    "AuraVAE16Loader": (AuraVAE16Loader, "Load AuraDiffusion 16ch VAE"),
    "AuraVAE16Decode": (AuraVAE16Decode, "AuraDiffusion 16ch VAE Decode"),
}
