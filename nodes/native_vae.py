"""A ComfyUI ``VAE`` around one of our native modules, written against the methods stock nodes call.

Core's ``comfy.sd.VAE`` sniffs keys to pick an architecture and would misread our files (it always builds a
mid-block attention the 16ch VAE may lack; it takes the Würstchen v2 VQGAN for Stable Cascade's Stage A with
another scale), and its private decode machinery changes between releases (0.33.0 decodes into a preallocated
buffer and calls ``process_output`` for its side effect). So this class does not inherit from it: it implements
the VAE interface that stock nodes use (VAEDecode, VAEEncode, VAEDecodeTiled, VAEEncodeTiled, VAEEncodeForInpaint,
VAESave, previews) with our own decode/encode/tiling, and uses only public model-management calls (listed in
``core_api``). The module provides ``decode(z)`` and ``encode(x)`` channels-first.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from ..waifukit.tiling import run_tiled
from .core_api import ModelPatcher, mm

WORKING_DTYPES = [torch.bfloat16, torch.float32]
FALLBACK_TILE = 64  # latent px per tile when an untiled decode/encode runs out of memory


class NativeVAE:
    latent_dim = 2
    output_channels = 3
    crop_input = True
    downscale_index_formula = None
    upscale_index_formula = None

    def __init__(self, module: torch.nn.Module, *, latent_channels: int, ratio: int, source: Path, dtype,
                 to_model: Callable, from_model: Callable, encode_bytes: int, decode_bytes: int):
        """``to_model`` maps pixels in [0, 1] to the module's input range; ``from_model`` maps its output back
        (clamped); both return new tensors. ``*_bytes`` are activation bytes per latent pixel per dtype byte,
        for model management's budget."""
        self.first_stage_model = module.eval()
        self.latent_channels = latent_channels
        self.downscale_ratio = self.upscale_ratio = ratio
        self.source = source
        self.to_model, self.from_model = to_model, from_model
        self._encode_bytes, self._decode_bytes = encode_bytes, decode_bytes
        self.device = mm.vae_device()
        self.output_device = mm.intermediate_device()
        self.vae_dtype = dtype
        self.first_stage_model.to(dtype)
        self.patcher = ModelPatcher(self.first_stage_model, load_device=self.device,
                                    offload_device=mm.vae_offload_device())

    # --- what stock nodes read -------------------------------------------------------------------------------
    def throw_exception_if_invalid(self):
        pass

    def spacial_compression_decode(self):
        return self.upscale_ratio

    def spacial_compression_encode(self):
        return self.downscale_ratio

    def temporal_compression_decode(self):
        return None

    def get_sd(self):
        return self.first_stage_model.state_dict()

    def model_size(self):
        return sum(t.numel() * t.element_size() for t in self.first_stage_model.state_dict().values())

    def is_dynamic(self):
        return False

    def vae_output_dtype(self):
        return torch.float32

    def vae_encode_crop_pixels(self, pixels):
        """[B,H,W,C] pixels centre-cropped to the compression grid, RGB only (what core's VAEs do)."""
        r = self.downscale_ratio
        for d in (1, 2):
            keep = pixels.shape[d] // r * r
            if keep != pixels.shape[d]:
                pixels = pixels.narrow(d, (pixels.shape[d] % r) // 2, keep)
        return pixels[..., :self.output_channels]

    # --- decode ----------------------------------------------------------------------------------------------
    def _load(self, per_pixel: int, h: int, w: int, batch: int = 1):
        mm.load_models_gpu([self.patcher], memory_required=per_pixel * h * w * batch * mm.dtype_size(self.vae_dtype))

    def _decode(self, z):
        out = self.first_stage_model.decode(z.to(self.device, self.vae_dtype))
        return self.from_model(out.float())

    def decode(self, samples_in, vae_options={}):
        """Latents [B,C,h,w] -> images [B,H,W,3] in [0, 1]; tiles when an untiled decode runs out of memory."""
        if samples_in.ndim == 5:
            samples_in = samples_in[:, :, 0]
        h, w = samples_in.shape[-2:]
        self._load(self._decode_bytes, h, w)
        with torch.no_grad():
            try:
                out = torch.cat([self._decode(z) for z in samples_in.split(1)])
            except torch.OutOfMemoryError:
                logging.warning("comfyui-waifu: VAE decode ran out of memory; decoding in tiles")
                mm.soft_empty_cache()
                out = run_tiled(self._decode, samples_in, (FALLBACK_TILE, FALLBACK_TILE), FALLBACK_TILE // 4,
                                1, self.upscale_ratio)
        return out.to(self.output_device).movedim(1, -1)

    def decode_tiled(self, samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        """Stock VAEDecodeTiled: tiles and overlap in latent pixels, seams blended (waifukit.tiling)."""
        tile_x, tile_y = tile_x or FALLBACK_TILE, tile_y or FALLBACK_TILE
        overlap = min(FALLBACK_TILE // 4 if overlap is None else overlap, min(tile_x, tile_y) // 2)
        self._load(self._decode_bytes, min(tile_y, samples.shape[-2]), min(tile_x, samples.shape[-1]))
        with torch.no_grad():
            out = run_tiled(self._decode, samples, (tile_y, tile_x), overlap, 1, self.upscale_ratio)
        return out.to(self.output_device).movedim(1, -1)

    # --- encode ----------------------------------------------------------------------------------------------
    def _encode(self, pixels_cf):
        return self.first_stage_model.encode(self.to_model(pixels_cf).to(self.device, self.vae_dtype)).float()

    def encode(self, pixel_samples):
        """Images [B,H,W,C] in [0, 1] -> latents [B,C,H/r,W/r]."""
        pixels = self.vae_encode_crop_pixels(pixel_samples).movedim(-1, 1)
        r = self.downscale_ratio
        self._load(self._encode_bytes, pixels.shape[-2] // r, pixels.shape[-1] // r)
        with torch.no_grad():
            try:
                out = torch.cat([self._encode(x) for x in pixels.split(1)])
            except torch.OutOfMemoryError:
                logging.warning("comfyui-waifu: VAE encode ran out of memory; encoding in tiles")
                mm.soft_empty_cache()
                out = run_tiled(self._encode, pixels, (FALLBACK_TILE, FALLBACK_TILE), FALLBACK_TILE // 4, r, 1)
        return out.to(self.output_device)

    def encode_tiled(self, pixel_samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        """Stock VAEEncodeTiled: tiles and overlap in pixels, seams blended in latent space."""
        pixels = self.vae_encode_crop_pixels(pixel_samples).movedim(-1, 1)
        r = self.downscale_ratio
        ty, tx = (tile_y or 512) // r, (tile_x or 512) // r
        ov = min((64 if overlap is None else overlap) // r, min(tx, ty) // 2)
        self._load(self._encode_bytes, min(ty, pixels.shape[-2] // r), min(tx, pixels.shape[-1] // r))
        with torch.no_grad():
            out = run_tiled(self._encode, pixels, (ty, tx), ov, r, 1)
        return out.to(self.output_device)
