"""ComfyUI glue for the SDXS UNet: a ``BaseModel`` inside a ``ModelPatcher``, so memory management and stock
samplers work. Its model sampling is core's discrete sampling with the prediction class the scheduler config
names (epsilon / v_prediction / sample) on sigmas computed from the exact diffusers betas (waifukit.ddpm),
never from core's make_beta_schedule (which differs per schedule and host, and returns numpy for
squaredcos_cap_v2); the config's clip_sample / thresholding is applied to the stock samplers' post-CFG x0 as
diffusers' steps apply it. ``LATENT["samples"]`` holds raw VAE latents; the snapshot's
scaling/shift factors live in the model's latent format. The conditioning SDXS reads is the pooled
MEXMA-SigLIP vector (``pooled_output``), fed as a single cross-attention token.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch


from ..waifukit import loading
from ..waifukit.ddpm import DDPMParams, DiscreteSchedule
from ..waifukit.mexma.model import MISSING_PROJECTOR
from ..waifukit.sdxs.unet import SDXSUNet, resolve_unet
from .common import WEIGHT_DTYPES, param_count, pick_dtype
from .vae16_host import Latent16
from .core_api import BASE, EPS, V_PREDICTION, X0, BaseModel, ModelPatcher, ModelSamplingDiscrete, ModelType, mm

# diffusers beta_schedule -> the nearest ComfyUI make_beta_schedule name, only for sampling_settings (what core's
# own model-sampling patch nodes rebuild from); the model's sampling itself uses the exact betas. ComfyUI's
# "linear" is diffusers' scaled_linear, its "cosine" the same alpha-bar cosine as squaredcos_cap_v2.
_COMFY_BETAS = {"linear": "sqrt_linear", "scaled_linear": "linear", "squaredcos_cap_v2": "cosine"}
_PREDICTION = {"epsilon": EPS, "v_prediction": V_PREDICTION, "sample": X0}
# ComfyUI's stand-in for the zero-SNR last step's alpha_bar 0 (comfy/model_sampling.py
# rescale_zero_terminal_snr_sigmas), so that sigma stays finite.
_ZSNR_LAST_ALPHA_BAR = 4.8973451890853435e-08


def model_sampling(schedule: DiscreteSchedule):
    """Core's ModelSamplingDiscrete + the scheduler's prediction class, with sigmas = sqrt((1 - a) / a) of the
    diffusers alphas_cumprod, so a stock sampler's timestep(sigma) lands on the training timesteps."""
    prediction = _PREDICTION[schedule.params.prediction_type]

    class SDXSModelSampling(ModelSamplingDiscrete, prediction):
        pass

    sampling = SDXSModelSampling()  # core's default schedule, replaced next
    alphas_cumprod = schedule.alphas_cumprod.double().clone()
    if schedule.params.rescale_betas_zero_snr:
        alphas_cumprod[-1] = _ZSNR_LAST_ALPHA_BAR
    sampling.set_sigmas(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)
    sampling.num_timesteps = schedule.params.num_train_timesteps
    return sampling


def _x0_limit(schedule: DiscreteSchedule):
    """A post-CFG function for stock samplers: clip_sample / thresholding on the guided x0, as diffusers' steps
    apply it to pred_original_sample after CFG."""
    def limit(args):
        return schedule.limit_x0(args["denoised"])
    return limit


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
        self.sampling_settings = {"timesteps": sched.num_train_timesteps, "zsnr": sched.rescale_betas_zero_snr}
        if sched.trained_betas is None:
            self.sampling_settings.update(beta_schedule=_COMFY_BETAS[sched.beta_schedule],
                                          linear_start=sched.beta_start, linear_end=sched.beta_end)


class SDXSModel(BaseModel):
    def __init__(self, model_config: SDXSConfig, device=None):
        # "sample" has no ModelType of its own: EPS here, the X0 prediction class in model_sampling below.
        kind = ModelType.V_PREDICTION if model_config.sched.prediction_type == "v_prediction" else ModelType.EPS
        super().__init__(model_config, kind, device=device, unet_model=SDXSUNet)
        self.schedule = DiscreteSchedule(model_config.sched)
        self.model_sampling = model_sampling(self.schedule)

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


def load_unet(path: Path, dtype_choice: str = "auto", vae_config: dict | None = None, weight_dtype: str = "default"):
    """A ComfyUI MODEL (ModelPatcher around SDXSModel) from a snapshot root, its unet/ folder or a single file.
    ``weight_dtype`` (WEIGHT_DTYPES) stores the weights in fp8 and computes in the chosen dtype, as ComfyUI's
    UNETLoader does."""
    params, sd, sched, weights = resolve_unet(path)
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    supported = SDXSConfig.supported_inference_dtypes
    dtype = pick_dtype(dtype_choice, load_device,
                       lambda: mm.unet_dtype(model_params=param_count(sd), supported_dtypes=supported))
    manual_cast = mm.unet_manual_cast(dtype, load_device, supported)
    storage = WEIGHT_DTYPES[weight_dtype]
    if storage is not None:
        # fp8 storage; compute as the same load without fp8 would (dtype, or its manual cast where the device
        # lacks it): every layer casts its weights on the fly (comfy.ops manual cast).
        manual_cast, dtype = manual_cast or dtype, storage
    if vae_config is None:
        # The latent scaling belongs to the VAE the UNet was trained with: the snapshot's vae/config.json, or
        # <stem>.vae.json beside a single file; else the 16ch VAE's 0.18215 / 0.
        vae_cfg_path = (weights.parent.parent / "vae" / "config.json" if weights.parent.name == "unet"
                        else weights.parent / f"{weights.name.split('.')[0]}.vae.json")
        vae_config = loading.read_json(vae_cfg_path) if vae_cfg_path and vae_cfg_path.is_file() else {}
    else:
        vae_cfg_path = "the VAE config"
    stats = [k for k in ("latents_mean", "latents_std") if vae_config.get(k) is not None]
    if stats:
        # Per-channel statistics change the latent space the UNet was trained in. The SDXS card's code decodes
        # latents / scaling_factor + shift_factor only, and diffusers' pipelines that read these fields never
        # combine them with a shift_factor: no published rule says how to apply them here, and applying
        # scaling_factor alone would be half of it. Refuse instead of guessing.
        raise loading.CheckpointError(
            f"{vae_cfg_path}: sets {' and '.join(stats)} (per-channel latent statistics), which the SDXS pipeline "
            "does not define how to apply together with scaling_factor/shift_factor. Use the VAE config the UNet "
            "was trained with (the snapshot's own vae/config.json), or remove these fields if the UNet was trained "
            "on plain scaling_factor/shift_factor latents")
    scale = float(vae_config.get("scaling_factor") or 0.18215)
    shift = float(vae_config.get("shift_factor") or 0.0)
    try:
        config = SDXSConfig(params, sched, scale, shift)
        if storage is not None:
            config.optimizations["fp8"] = weight_dtype.endswith("_fast")
        config.set_inference_dtype(dtype, manual_cast)
        model = SDXSModel(config, device=offload_device)
    except ValueError as e:
        raise loading.CheckpointError(f"{weights}: {e}") from None
    loading.load_strict(model.diffusion_model, sd, weights)
    model.sdxs_source = str(weights)
    logging.info("comfyui-waifu: SDXS UNet from %s (%s, %s, latent scale %s shift %s)", weights, dtype,
                 sched.prediction_type, scale, shift)
    patcher = ModelPatcher(model, load_device=load_device, offload_device=offload_device)
    if sched.thresholding or sched.clip_sample:
        patcher.set_model_sampler_post_cfg_function(_x0_limit(model.schedule))
    return patcher
