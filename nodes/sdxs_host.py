"""ComfyUI glue for the SDXS UNet: a ``BaseModel`` (EPS or V_PREDICTION as the scheduler
config says, ComfyUI's discrete model sampling on the same betas) inside a ``ModelPatcher``, so memory
management and stock samplers work. ``LATENT["samples"]`` holds raw VAE latents; the snapshot's
scaling/shift factors live in the model's latent format. The conditioning SDXS reads is the pooled
MEXMA-SigLIP vector (``pooled_output``), fed as a single cross-attention token.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch


from ..waifukit import loading
from ..waifukit.ddpm import DDPMParams, DiscreteSchedule
from ..waifukit.mexma import MISSING_PROJECTOR
from ..waifukit.sdxs import SDXSUNet, resolve_unet
from .common import param_count, pick_dtype
from .vae16_host import Latent16
from .core_api import BASE, BaseModel, ModelPatcher, ModelType, mm

# diffusers beta_schedule -> ComfyUI make_beta_schedule name (ComfyUI's "linear" is diffusers' scaled_linear).
_COMFY_BETAS = {"linear": "sqrt_linear", "scaled_linear": "linear", "squaredcos_cap_v2": "squaredcos_cap_v2"}


class SDXSConfig(BASE):
    unet_config = {}
    unet_extra_config = {}
    latent_format = Latent16
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]
    memory_usage_factor = 1.5

    def __init__(self, params, sched: DDPMParams, scale: float, shift: float):
        super().__init__({"params": params})
        self.latent_format = Latent16(scale, shift)
        self.sched = sched
        if sched.trained_betas is not None:
            raise ValueError("trained_betas are not supported by ComfyUI's model sampling")
        self.sampling_settings = {"beta_schedule": _COMFY_BETAS[sched.beta_schedule], "linear_start": sched.beta_start,
                                  "linear_end": sched.beta_end, "timesteps": sched.num_train_timesteps,
                                  "zsnr": sched.rescale_betas_zero_snr}


class SDXSModel(BaseModel):
    def __init__(self, model_config: SDXSConfig, device=None):
        kind = {"epsilon": ModelType.EPS,
                "v_prediction": ModelType.V_PREDICTION}.get(model_config.sched.prediction_type)
        if kind is None:
            raise ValueError(f"prediction_type {model_config.sched.prediction_type!r} has no ComfyUI model type; "
                             "only epsilon and v_prediction SDXS checkpoints are supported")
        super().__init__(model_config, kind, device=device, unet_model=SDXSUNet)
        self.schedule = DiscreteSchedule(model_config.sched)

    def extra_conds(self, **kwargs):
        # The pooled MEXMA-SigLIP vector is SDXS's context (one token), whatever per-token states the
        # CONDITIONING also carries for other models; stock samplers get it through here.
        kwargs = dict(kwargs)
        kwargs.pop("attention_mask", None)
        dim = self.diffusion_model.params.cross_attention_dim
        pooled = kwargs.get("pooled_output")
        if pooled is not None and pooled.shape[-1] == dim:
            kwargs["cross_attn"] = pooled.reshape(pooled.shape[0], 1, dim)
        elif kwargs.get("cross_attn") is not None and kwargs["cross_attn"].shape[-1] != dim:
            raise ValueError(MISSING_PROJECTOR)
        return super().extra_conds(**kwargs)


def load_unet(path: Path, dtype_choice: str = "auto", vae_config: dict | None = None):
    """A ComfyUI MODEL (ModelPatcher around SDXSModel) from a snapshot root, its unet/ folder or a single file."""
    params, sd, sched, weights = resolve_unet(path)
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    supported = SDXSConfig.supported_inference_dtypes
    dtype = pick_dtype(dtype_choice, load_device,
                       lambda: mm.unet_dtype(model_params=param_count(sd), supported_dtypes=supported))
    manual_cast = mm.unet_manual_cast(dtype, load_device, supported)
    if vae_config is None:
        # The latent scaling belongs to the VAE the UNet was trained with: the snapshot's vae/config.json, or
        # <stem>.vae.json beside a single file; else the 16ch VAE's 0.18215 / 0.
        vae_cfg_path = (weights.parent.parent / "vae" / "config.json" if weights.parent.name == "unet"
                        else weights.parent / f"{weights.name.split('.')[0]}.vae.json")
        vae_config = loading.read_json(vae_cfg_path) if vae_cfg_path and vae_cfg_path.is_file() else {}
    scale = float(vae_config.get("scaling_factor") or 0.18215)
    shift = float(vae_config.get("shift_factor") or 0.0)
    try:
        config = SDXSConfig(params, sched, scale, shift)
        config.set_inference_dtype(dtype, manual_cast)
        model = SDXSModel(config, device=offload_device)
    except ValueError as e:
        raise loading.CheckpointError(f"{weights}: {e}") from None
    loading.load_strict(model.diffusion_model, sd, weights)
    model.sdxs_source = str(weights)
    logging.info("comfyui-waifu: SDXS UNet from %s (%s, %s, latent scale %s shift %s)", weights, dtype,
                 sched.prediction_type, scale, shift)
    return ModelPatcher(model, load_device=load_device, offload_device=offload_device)
