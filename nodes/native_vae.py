"""A ``comfy.sd.VAE`` set up by hand around one of our native modules.

Core's VAE constructor sniffs keys to pick an architecture, and would misread our files (it always builds a
mid-block attention the 16ch VAE may lack; it takes the Würstchen v2 VQGAN for Stable Cascade's Stage A with
another scale). So the attributes core's stock nodes use (VAEDecode, VAEEncode, VAEDecodeTiled) are set the
way core sets them for a VAE it recognises, with our module as ``first_stage_model`` (``decode(z)``,
``encode(x)``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd

WORKING_DTYPES = [torch.bfloat16, torch.float32]


class NativeVAE(comfy.sd.VAE):
    def __init__(self, module: torch.nn.Module, *, latent_channels: int, ratio: int, source: Path, dtype,
                 process_input: Callable, process_output: Callable, encode_bytes: int, decode_bytes: int):
        # Memory estimates per latent pixel (times the dtype size), as core's lambdas take them.
        self.memory_used_encode = lambda shape, dtype: encode_bytes * shape[2] * shape[3] * mm.dtype_size(dtype)
        self.memory_used_decode = lambda shape, dtype: decode_bytes * shape[2] * shape[3] * mm.dtype_size(dtype)
        self.downscale_ratio = self.upscale_ratio = ratio
        self.latent_channels = latent_channels
        self.latent_dim = 2
        self.output_channels = 3
        self.process_input = process_input
        self.process_output = process_output
        self.working_dtypes = WORKING_DTYPES
        self.disable_offload = False
        self.not_video = False
        self.size = None
        self.downscale_index_formula = None
        self.upscale_index_formula = None
        self.extra_1d_channel = None
        self.crop_input = True
        self.first_stage_model = module.eval()
        self.device = mm.vae_device()
        self.vae_dtype = dtype
        self.first_stage_model.to(dtype)
        self.output_device = mm.intermediate_device()
        self.patcher = comfy.model_patcher.ModelPatcher(self.first_stage_model, load_device=self.device,
                                                        offload_device=mm.vae_offload_device())
        self.source = source
        self.model_size()
