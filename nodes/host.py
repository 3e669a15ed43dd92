"""Glue between the pure-torch core and ComfyUI's data conventions (imports comfy; no node classes here).

- The DiT is a ``comfy.model_base.BaseModel`` with FLOW model sampling (shift from the snapshot,
  multiplier 1000) inside a ``ModelPatcher``, so stock samplers and memory management work on it.
- ``LATENT["samples"]`` holds raw VAE latents; the 0.18215 scaling lives in the latent format, as in core.
- The VAE is a ``comfy.sd.VAE`` whose ``first_stage_model`` is our native AutoencoderKL, so stock
  VAEDecode / VAEEncode accept it.
- ``CONDITIONING`` is ``[[hidden [B,L,1024], {"attention_mask": [B,L]}]]``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.supported_models_base

from ..waifukit import loading
from ..waifukit.sana import LinearDiT
from ..waifukit.vae import AutoencoderKL
from ..waifukit.xlmr import XLMRobertaTextModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_CHOICES = ["auto", "fp32", "bf16", "fp16"]


class AuraLatent16(comfy.latent_formats.LatentFormat):
    """AuraDiffusion 16ch VAE latents as Waifu was trained on them: plain 0.18215 scale, no shift."""
    latent_channels = 16

    def __init__(self):
        self.scale_factor = 0.18215


class WaifuConfig(comfy.supported_models_base.BASE):
    unet_config = {}
    unet_extra_config = {}
    latent_format = AuraLatent16
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]
    memory_usage_factor = 2.0

    def __init__(self, params, shift: float):
        super().__init__({"params": params})
        self.sampling_settings = {"shift": float(shift), "multiplier": 1000}


class WaifuDiT(comfy.model_base.BaseModel):
    def __init__(self, model_config, device=None):
        super().__init__(model_config, comfy.model_base.ModelType.FLOW, device=device, unet_model=LinearDiT)

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            out["attention_mask"] = comfy.conds.CONDRegular(mask)
        return out


def _param_count(sd: dict) -> int:
    return sum(t.numel() for t in sd.values())


def pick_dtype(choice: str, device, auto):
    """The loaders' dtype widget: an explicit choice wins; auto is fp32 on CPU (the pack's faithful eager
    path; ComfyUI would pick fp16 for text encoders there) and ComfyUI's own pick on accelerators."""
    if choice != "auto":
        return DTYPES[choice]
    if torch.device(device).type == "cpu":
        return torch.float32
    return auto()


def load_dit(path: Path, dtype_choice: str = "auto", default_shift: float = 3.0):
    """A ComfyUI MODEL (ModelPatcher around WaifuDiT) from any supported transformer layout."""
    res = loading.resolve_linear_dit(path)
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    supported = WaifuConfig.supported_inference_dtypes
    dtype = pick_dtype(dtype_choice, load_device,
                       lambda: mm.unet_dtype(model_params=_param_count(res.state_dict), supported_dtypes=supported))
    manual_cast = mm.unet_manual_cast(dtype, load_device, supported)
    config = WaifuConfig(res.params, res.extra["shift"] or default_shift)
    config.set_inference_dtype(dtype, manual_cast)
    model = WaifuDiT(config, device=offload_device)
    loading.load_strict(model.diffusion_model, res.state_dict, res.source)
    model.waifu_source = str(res.source)
    logging.info("comfyui-waifu: Linear DiT from %s (%s, shift %s)", res.source, dtype, config.sampling_settings["shift"])
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


class MexmaTextEncoder:
    """The MEXMA-SigLIP text tower (XLM-R) with its tokenizer, kept in a ModelPatcher."""

    def __init__(self, module: XLMRobertaTextModel, tokenizer, source: Path, load_device, offload_device):
        self.module = module
        self.tokenizer = tokenizer
        self.source = source
        self.patcher = comfy.model_patcher.ModelPatcher(module, load_device=load_device, offload_device=offload_device)

    def encode(self, texts: list[str], max_length: int = 512):
        ids, mask = self.tokenizer(texts, max_length=max_length)
        mm.load_models_gpu([self.patcher])
        device = self.patcher.load_device
        with torch.inference_mode():
            hidden = self.module(ids.to(device), mask.to(device))
        out = mm.intermediate_device()
        return hidden.float().to(out), mask.to(out)


def load_text_encoder(path: Path, dtype_choice: str = "auto", tokenizer: Path | None = None) -> MexmaTextEncoder:
    res = loading.resolve_text_encoder(path, tokenizer)
    load_device, offload_device = mm.text_encoder_device(), mm.text_encoder_offload_device()
    dtype = pick_dtype(dtype_choice, load_device, lambda: mm.text_encoder_dtype(load_device))
    module = XLMRobertaTextModel(res.params, dtype=dtype, device=offload_device).eval()
    loading.load_strict(module, res.state_dict, res.source)
    return MexmaTextEncoder(module, res.extra["tokenizer"], res.source, load_device, offload_device)


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


def load_vae(path: Path, dtype_choice: str = "auto") -> AuraVAE:
    res = loading.resolve_vae(path)
    module = AutoencoderKL(res.params, dtype=torch.float32)
    loading.load_strict(module, res.state_dict, res.source)
    device = mm.vae_device()
    dtype = pick_dtype(dtype_choice, device, lambda: mm.vae_dtype(device, AuraVAE.WORKING_DTYPES))
    return AuraVAE(module, res.params.latent_channels, res.source, dtype)
