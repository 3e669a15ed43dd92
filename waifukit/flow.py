"""Flow-matching schedule and Euler sampler (the Waifu / Sana inference loop), pure torch.

The sigma schedule reproduces diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps`` for a static
shift, including its quirk of shifting an already-shifted sigma_min, so that a seed gives the reference
image. The model predicts the velocity v ~ noise - x0; the timestep it sees is 1000 * sigma.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch


@dataclass
class FlowScheduleConfig:
    shift: float = 3.0
    num_train_timesteps: int = 1000

    # Options of FlowMatchEulerDiscreteScheduler this port does not implement: a config that turns any of
    # them on is refused instead of silently sampling something else.
    _UNSUPPORTED = ("use_dynamic_shifting", "invert_sigmas", "shift_terminal", "use_karras_sigmas",
                    "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling")

    @classmethod
    def from_scheduler_config(cls, cfg: dict) -> "FlowScheduleConfig":
        name = cfg.get("_class_name", "FlowMatchEulerDiscreteScheduler")
        if name != "FlowMatchEulerDiscreteScheduler":
            raise ValueError(f"scheduler_config.json names {name!r}; Waifu samples with FlowMatchEulerDiscreteScheduler")
        on = [k for k in cls._UNSUPPORTED if cfg.get(k)]
        if on:
            raise ValueError(f"scheduler_config.json enables {on}, which the flow-Euler sampler does not implement")
        return cls(shift=float(cfg.get("shift", 1.0)), num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)))


def flow_sigmas(steps: int, shift: float = 3.0, num_train_timesteps: int = 1000, denoise: float = 1.0) -> torch.Tensor:
    """float32 sigmas [steps + 1] ending in 0, as diffusers computes them.

    ``denoise`` < 1 follows ComfyUI's KSampler convention: build the schedule for ``steps / denoise`` steps and
    keep its last ``steps`` steps, so the number of model calls is always ``steps``.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    total = steps if denoise >= 1.0 else int(steps / denoise)
    n = num_train_timesteps
    # __init__: the training grid (float32) shifted once; its last entry is sigma_min.
    grid = torch.from_numpy(np.linspace(1, n, n, dtype=np.float32)[::-1].copy()) / n
    grid = shift * grid / (1 + (shift - 1) * grid)
    sigma_max, sigma_min = grid[0].item(), grid[-1].item()
    # set_timesteps: linspace in float64 between the shifted ends, then shifted again.
    s = np.linspace(sigma_max * n, sigma_min * n, total) / n
    s = shift * s / (1 + (shift - 1) * s)
    sigmas = torch.cat([torch.from_numpy(s).to(torch.float32), torch.zeros(1)])
    return sigmas[-(steps + 1):]


# model_fn(x, timesteps [B], context, mask) -> velocity, all batched along dim 0.
ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def sample_flow_euler(model_fn: ModelFn, x: torch.Tensor, sigmas: torch.Tensor,
                      cond: torch.Tensor, cond_mask: Optional[torch.Tensor],
                      uncond: Optional[torch.Tensor] = None, uncond_mask: Optional[torch.Tensor] = None,
                      cfg: float = 1.0, callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
                      ) -> torch.Tensor:
    """Euler over ``sigmas`` from x at sigmas[0]; returns x at sigmas[-1].

    CFG runs one batch ordered [uncond, cond] (as the reference pipeline does) and combines
    v = v_u + cfg * (v_c - v_u); cfg == 1 skips the unconditional half. The state stays in float32.
    ``callback(i, x0_estimate, x)`` runs after each step (progress, previews, interrupts).
    """
    use_cfg = uncond is not None and cfg != 1.0
    if use_cfg:
        context = torch.cat([uncond, cond])
        mask = None if cond_mask is None else torch.cat([uncond_mask, cond_mask])
    else:
        context, mask = cond, cond_mask
    x = x.float()
    sig = sigmas.float()
    for i in range(len(sig) - 1):
        x_in = torch.cat([x, x]) if use_cfg else x
        t = (sig[i] * 1000.0).expand(x_in.shape[0]).to(x.device)
        v = model_fn(x_in, t, context, mask).float()
        if use_cfg:
            v_u, v_c = v.chunk(2)
            v = v_u + cfg * (v_c - v_u)
        x_next = x + (sig[i + 1] - sig[i]) * v
        if callback is not None:
            callback(i, x - sig[i] * v, x_next)
        x = x_next
    return x


def initial_noise(shape, seed: int) -> torch.Tensor:
    """The pack's noise convention: the whole batch in one call on a CPU generator, float32."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed)), dtype=torch.float32)
