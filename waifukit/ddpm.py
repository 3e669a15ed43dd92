"""Discrete-time diffusion schedule with DDPM (ancestral) and DDIM (eta 0) steps, pure torch.

Provenance: written from the equations of diffusers' ``DDPMScheduler`` / ``DDIMScheduler``
(diffusers/schedulers/scheduling_ddpm.py, scheduling_ddim.py, read in 0.42.1) so that the same
scheduler_config.json, seed and model give the reference latents: betas, cumulative alphas and every step
coefficient are computed in float32 with the same operation order, timesteps with numpy as there. The DDPM
step draws its noise from the caller's CPU generator in the reference's order (one ``randn`` of the full
batch per step with t > 0, after the initial latent).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from .latents import batch_noise


@dataclass
class DDPMParams:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: Optional[list] = None
    variance_type: str = "fixed_small"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    set_alpha_to_one: bool = True  # DDIM only (DDPM's final step always uses alpha_prod 1)
    thresholding: bool = False  # dynamic thresholding of the x0 estimate (replaces clip_sample when on)
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0

    SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
    VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")
    PREDICTIONS = ("epsilon", "v_prediction", "sample")
    SPACINGS = ("linspace", "leading", "trailing")

    def __post_init__(self):
        if int(self.num_train_timesteps) < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if self.trained_betas is None and self.beta_schedule not in self.SCHEDULES:
            raise ValueError(f"beta_schedule {self.beta_schedule!r} is not supported (supported: {self.SCHEDULES})")
        if self.variance_type not in self.VARIANCES:
            raise ValueError(f"variance_type {self.variance_type!r} is not supported (supported: {self.VARIANCES}; "
                             "learned variances need a model predicting them)")
        if self.prediction_type not in self.PREDICTIONS:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not supported (supported: {self.PREDICTIONS})")
        if self.timestep_spacing not in self.SPACINGS:
            raise ValueError(f"timestep_spacing {self.timestep_spacing!r} is not supported (supported: {self.SPACINGS})")
        if self.variance_type == "fixed_large_log":
            # diffusers' DDPM step takes (log beta) ** 0.5 there: NaN for every beta < 1.
            raise ValueError("variance_type 'fixed_large_log' gives NaN in diffusers' DDPM step; use another "
                             f"variance_type (supported: {tuple(v for v in self.VARIANCES if v != 'fixed_large_log')})")
        if self.rescale_betas_zero_snr and self.prediction_type == "epsilon":
            # The zero-SNR last timestep has alpha_bar 0: x0 = (x - eps) / 0 is undefined (diffusers: inf/NaN).
            raise ValueError("rescale_betas_zero_snr with prediction_type 'epsilon' has no x0 at the last "
                             "timestep (diffusers divides by zero there); zero-SNR models use v_prediction")
        if self.thresholding and not (0.0 < self.dynamic_thresholding_ratio <= 1.0 and self.sample_max_value >= 1.0):
            raise ValueError(f"thresholding needs 0 < dynamic_thresholding_ratio <= 1 and sample_max_value >= 1, got "
                             f"{self.dynamic_thresholding_ratio} and {self.sample_max_value}")

    @classmethod
    def from_scheduler_config(cls, cfg: dict) -> "DDPMParams":
        """From a diffusers scheduler_config.json of a DDPM/DDIM-family scheduler (beta-schedule based)."""
        name = cfg.get("_class_name", "DDPMScheduler")
        known = ("DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                 "PNDMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "LMSDiscreteScheduler")
        if name not in known:
            raise ValueError(f"scheduler_config.json names {name!r}; expected a beta-schedule scheduler "
                             "(DDPMScheduler) for a UNet")
        d = cls()
        return cls(
            num_train_timesteps=int(cfg.get("num_train_timesteps", d.num_train_timesteps)),
            beta_start=float(cfg.get("beta_start", d.beta_start)),
            beta_end=float(cfg.get("beta_end", d.beta_end)),
            beta_schedule=cfg.get("beta_schedule", d.beta_schedule),
            trained_betas=cfg.get("trained_betas"),
            variance_type=cfg.get("variance_type") or d.variance_type,
            clip_sample=bool(cfg.get("clip_sample", d.clip_sample)),
            clip_sample_range=float(cfg.get("clip_sample_range", d.clip_sample_range)),
            prediction_type=cfg.get("prediction_type", d.prediction_type),
            timestep_spacing=cfg.get("timestep_spacing", d.timestep_spacing),
            steps_offset=int(cfg.get("steps_offset", d.steps_offset) or 0),
            rescale_betas_zero_snr=bool(cfg.get("rescale_betas_zero_snr", False)),
            set_alpha_to_one=bool(cfg.get("set_alpha_to_one", True)),
            thresholding=bool(cfg.get("thresholding", False)),
            dynamic_thresholding_ratio=float(cfg.get("dynamic_thresholding_ratio", d.dynamic_thresholding_ratio)),
            sample_max_value=float(cfg.get("sample_max_value", d.sample_max_value)),
        )


def _betas_for_alpha_bar(n: int, max_beta: float = 0.999) -> torch.Tensor:
    # squaredcos_cap_v2 (Nichol & Dhariwal cosine schedule), python floats then float32 as diffusers.
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return torch.tensor([min(1 - f((i + 1) / n) / f(i / n), max_beta) for i in range(n)], dtype=torch.float32)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    # Lin et al. 2023, Algorithm 1: shift/scale sqrt(alpha_bar) so the last step has zero SNR.
    ab_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = ab_sqrt[0].clone(), ab_sqrt[-1].clone()
    ab_sqrt = (ab_sqrt - last) * (first / (first - last))  # diffusers' operation order, for equal floats
    ab = ab_sqrt ** 2
    ab = torch.cat([ab[0:1], ab[1:] / ab[:-1]])
    return 1 - ab


class DiscreteSchedule:
    """The training noise schedule of a DDPM-family model, with the inference steps built on it."""

    def __init__(self, params: DDPMParams):
        self.params = p = params
        n = p.num_train_timesteps
        if p.trained_betas is not None:
            betas = torch.tensor(p.trained_betas, dtype=torch.float32)
            if betas.shape != (n,):
                raise ValueError(f"trained_betas has {betas.numel()} entries, num_train_timesteps is {n}")
        elif p.beta_schedule == "linear":
            betas = torch.linspace(p.beta_start, p.beta_end, n, dtype=torch.float32)
        elif p.beta_schedule == "scaled_linear":
            betas = torch.linspace(p.beta_start ** 0.5, p.beta_end ** 0.5, n, dtype=torch.float32) ** 2
        else:
            betas = _betas_for_alpha_bar(n)
        if p.rescale_betas_zero_snr:
            betas = _rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.one = torch.tensor(1.0)

    # ------------------------------------------------------------------ timesteps
    def timesteps(self, steps: int) -> np.ndarray:
        """Descending int64 timesteps, as ``set_timesteps(steps)`` gives them."""
        p, n = self.params, self.params.num_train_timesteps
        if not 1 <= steps <= n:
            raise ValueError(f"steps must be between 1 and num_train_timesteps ({n}), got {steps}")
        if p.timestep_spacing == "linspace":
            return np.linspace(0, n - 1, steps).round()[::-1].copy().astype(np.int64)
        if p.timestep_spacing == "leading":
            ratio = n // steps
            ts = (np.arange(0, steps) * ratio).round()[::-1].copy().astype(np.int64) + p.steps_offset
            if ts[0] >= n:  # diffusers indexes past its table here (IndexError); say what to do instead
                raise ValueError(f"{steps} steps with 'leading' spacing and steps_offset {p.steps_offset} reach "
                                 f"timestep {ts[0]}, past the {n} training timesteps; use at most {n - 1} steps")
            return ts
        ratio = n / steps
        return np.round(np.arange(n, 0, -ratio)).astype(np.int64) - 1

    def _alpha_prev(self, prev_t: int, final: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod[prev_t] if prev_t >= 0 else final

    def _x0(self, model_output, t: int, sample):
        a, b = self.alphas_cumprod[t], 1 - self.alphas_cumprod[t]
        kind = self.params.prediction_type
        if kind == "epsilon":
            x0 = (sample - b ** 0.5 * model_output) / a ** 0.5
        elif kind == "v_prediction":
            x0 = a ** 0.5 * sample - b ** 0.5 * model_output
        else:
            x0 = model_output
        return x0

    def limit_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """What diffusers' DDPM/DDIM steps do to the x0 estimate: dynamic thresholding (per sample, the
        ``dynamic_thresholding_ratio`` quantile of |x0| clamped to [1, sample_max_value], then clamp and divide),
        else ``clip_sample`` to +-``clip_sample_range``, else nothing. Also applied to the stock samplers'
        post-CFG denoised (nodes/sdxs_host.py), which is the same model-space x0."""
        p = self.params
        if p.thresholding:
            dtype, shape = x0.dtype, x0.shape
            flat = x0.float().reshape(shape[0], -1)
            s = torch.quantile(flat.abs(), p.dynamic_thresholding_ratio, dim=1)
            s = torch.clamp(s, min=1, max=p.sample_max_value).unsqueeze(1)
            return (torch.clamp(flat, -s, s) / s).reshape(shape).to(dtype)
        if p.clip_sample:
            r = p.clip_sample_range
            x0 = x0.clamp(-r, r)
        return x0

    _clip = limit_x0

    # ------------------------------------------------------------------ steps
    def ddpm_step(self, model_output: torch.Tensor, t: int, prev_t: int, sample: torch.Tensor,
                  noise: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One ancestral step t -> prev_t (prev_t = -1 at the end). ``noise`` ~ N(0, I) is used when t > 0.
        Returns (prev_sample, pred_original_sample)."""
        a_t = self.alphas_cumprod[t]
        a_prev = self._alpha_prev(prev_t, self.one)
        b_t, b_prev = 1 - a_t, 1 - a_prev
        cur_alpha = a_t / a_prev
        cur_beta = 1 - cur_alpha
        x0 = self._clip(self._x0(model_output, t, sample))
        mean = (a_prev ** 0.5 * cur_beta) / b_t * x0 + cur_alpha ** 0.5 * b_prev / b_t * sample
        if t > 0:
            if noise is None:
                raise ValueError("the DDPM step needs noise for t > 0")
            var = torch.clamp((1 - a_prev) / (1 - a_t) * cur_beta, min=1e-20)
            kind = self.params.variance_type
            if kind == "fixed_small":
                mean = mean + var ** 0.5 * noise
            elif kind == "fixed_small_log":
                # diffusers multiplies by exp(0.5 log var) directly (a standard deviation), no extra sqrt.
                mean = mean + torch.exp(0.5 * torch.log(var)) * noise
            elif kind == "fixed_large":
                mean = mean + cur_beta ** 0.5 * noise
            else:  # fixed_large_log is refused in DDPMParams (NaN in diffusers)
                raise ValueError(f"variance_type {kind!r} is not supported")
        return mean, x0

    def ddim_step(self, model_output: torch.Tensor, t: int, sample: torch.Tensor, steps: int,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """One deterministic DDIM (eta 0) step from t, with diffusers' previous timestep t - N // steps."""
        n = self.params.num_train_timesteps
        prev_t = t - n // steps
        final = self.one if self.params.set_alpha_to_one else self.alphas_cumprod[0]
        a_t = self.alphas_cumprod[t]
        a_prev = self._alpha_prev(prev_t, final)
        b_t = 1 - a_t
        kind = self.params.prediction_type
        x0 = self._x0(model_output, t, sample)
        if kind == "epsilon":
            eps = model_output
        elif kind == "v_prediction":
            eps = a_t ** 0.5 * model_output + b_t ** 0.5 * sample
        else:
            eps = (sample - a_t ** 0.5 * x0) / b_t ** 0.5
        x0 = self._clip(x0)
        return a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps, x0

    def as_output(self, x0: torch.Tensor, t: int, sample: torch.Tensor) -> torch.Tensor:
        """The model output (of this prediction type) whose x0 estimate at ``sample`` is ``x0``."""
        a, b = self.alphas_cumprod[t], 1 - self.alphas_cumprod[t]
        kind = self.params.prediction_type
        if kind == "epsilon":
            return (sample - a ** 0.5 * x0) / b ** 0.5
        if kind == "v_prediction":
            return (a ** 0.5 * sample - x0) / b ** 0.5
        return x0

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        a = self.alphas_cumprod[t].to(x0.dtype)
        return a ** 0.5 * x0 + (1 - a) ** 0.5 * noise


SAMPLERS = ("ddpm", "ddim")
# model_fn(x [B,...], timesteps float [B]) -> model output (already CFG-combined).
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sample(model_fn: ModelFn, schedule: DiscreteSchedule, shape, steps: int, generator: torch.Generator,
           sampler: str = "ddpm", start: Optional[torch.Tensor] = None, denoise: float = 1.0, device=None,
           callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
           batch_index=None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reference loop: x_T = randn(shape, generator) then ``steps`` scheduler steps; the state stays
    float32 on ``device``; noise is always drawn on the (CPU) generator and moved.

    ``denoise`` < 1 with ``start`` (x0 latents, model space): ComfyUI's convention, the last ``steps`` of a
    ``steps/denoise`` schedule, with ``start`` noised to the first of them by the same initial draw.
    ``callback(i, x0_estimate, x)`` runs after each step.

    ``batch_index`` (a LATENT's): the initial draw is made per index as ComfyUI's prepare_noise does (the DDPM
    steps' noise then continues on the generator for the whole batch). ``mask`` ([B,C,h,w], 1 = resample; needs
    ``start``): ComfyUI's noise_mask convention (comfy/samplers.py ``KSamplerX0Inpaint``): where it is 0 the
    model sees ``start`` noised to the current timestep with the initial noise, and the step uses ``start`` as
    the x0 estimate there, relative to the unblended state. With ddim this is k-diffusion's Euler on ComfyUI's
    sigmas, step for step."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    total = steps if denoise >= 1.0 else max(steps, int(steps / denoise))
    ts = schedule.timesteps(total)
    ts = ts[-steps:] if total != steps else ts
    x = batch_noise(shape, generator, batch_index)
    if mask is not None:
        if start is None:
            raise ValueError("a noise mask needs the input latent (latent_image) it keeps")
        dev = device if device is not None else x.device
        mask, keep, noise0, kept = mask.float().to(dev), (1.0 - mask.float()).to(dev), x.to(dev), start.float().to(dev)
    if start is not None and (total != steps or mask is not None):
        # With a mask KSampler always starts from the input noised to the first timestep (with "leading"
        # spacing that timestep is below the training maximum, so some of the input shows through).
        x = schedule.add_noise(start.float().cpu(), x, int(ts[0]))
    x = x.to(device) if device is not None else x
    for i, t in enumerate(ts.tolist()):
        x_model = x if mask is None else x * mask + schedule.add_noise(kept, noise0, t) * keep
        out = model_fn(x_model, torch.full((x.shape[0],), float(t), device=x.device)).float()
        if mask is not None:
            x0 = schedule._x0(out, t, x_model) * mask + kept * keep
            out = schedule.as_output(x0, t, x)
        if sampler == "ddpm":
            prev_t = int(ts[i + 1]) if i + 1 < len(ts) else -1
            noise = torch.randn(tuple(out.shape), generator=generator, dtype=torch.float32) if t > 0 else None
            x_next, x0 = schedule.ddpm_step(out, t, prev_t, x, None if noise is None else noise.to(x.device))
        else:
            x_next, x0 = schedule.ddim_step(out, t, x, total)
        if callback is not None:
            callback(i, x0, x_next)
        x = x_next
    return x
