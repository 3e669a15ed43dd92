"""AuraDiffusion 16-channel VAE nodes (declarations only)."""
from __future__ import annotations


from ..waifukit.tiling import decode_tiled
from . import vae16_host
from .common import CATEGORY, DTYPE_INPUT, model_file
from .core_api import folder_paths


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


AUTO_TILE = 1280  # px; one 1280^2 tile of the real VAE in bf16 needs ~3 GB of activations


class AuraVAE16Decode:
    DESCRIPTION = "Decodes raw 16-channel latents with the AuraDiffusion VAE (no extra scaling: LATENT is raw)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT", {"tooltip": "Raw 16-channel latents, e.g. from LinearDiTSampler."}),
            "vae": ("VAE", {"tooltip": "The 16-channel VAE (snapshot loader or AuraVAE16Loader)."}),
        }, "optional": {
            "tile_size": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 64,
                                  "tooltip": f"Decode in tiles of this many pixels (bounded memory for large images). "
                                             f"0 = auto: tiles of {AUTO_TILE} px when a side exceeds {AUTO_TILE} px."}),
            "overlap": ("INT", {"default": 128, "min": 0, "max": 1024, "step": 8,
                                "tooltip": "Pixels by which tiles overlap; seams are blended across it."}),
        }}

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("Images [B,H,W,3] in 0..1.",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY

    def decode(self, samples, vae, tile_size=0, overlap=128):
        z = samples["samples"]
        if z.ndim != 4 or z.shape[1] != vae.latent_channels:
            raise ValueError(f"latent has shape {tuple(z.shape)}; this VAE decodes {vae.latent_channels}-channel "
                             "latents [B,C,H/8,W/8]")
        tile = tile_size or AUTO_TILE
        if max(z.shape[-2:]) * 8 <= tile:
            return (vae.decode(z),)
        pixels = decode_tiled(lambda t: vae.decode(t).movedim(-1, 1), z, tile // 8, min(overlap, tile // 2) // 8)
        return (pixels.movedim(1, -1).clamp(0, 1),)


NODES = {
    "AuraVAE16Loader": (AuraVAE16Loader, "Load AuraDiffusion 16ch VAE"),
    "AuraVAE16Decode": (AuraVAE16Decode, "AuraDiffusion 16ch VAE Decode"),
}
