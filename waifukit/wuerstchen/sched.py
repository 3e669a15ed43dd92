"""The Würstchen DDPM sampler (diffusers ``DDPMWuerstchenScheduler``, scaler 1, s 0.008), pure torch.

Provenance: formulas from diffusers ``schedulers/scheduling_ddpm_wuerstchen.py``
(https://github.com/huggingface/diffusers/blob/main/src/diffusers/schedulers/scheduling_ddpm_wuerstchen.py)
and dome272's ``diffuzz`` (https://github.com/dome272/Wuerstchen, diffuzz.py), written here in the same float32
operation order so that a step is bit-identical.

Noise: every stage draws from its own CPU ``torch.Generator`` seeded with the stage's seed, in the reference
pipeline's order: the initial latent, then one draw per step (also the last, whose noise is multiplied by 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

SCHEDULES = ("wuerstchen_default", "linear")


@dataclass
class WuerstchenScheduleParams:
    s: float = 0.008
    scaler: float = 1.0

    def __post_init__(self):
        if not 0 <= self.s < 1 or self.scaler <= 0:
            raise ValueError(f"scheduler config: need 0 <= s < 1 and scaler > 0, got s={self.s}, scaler={self.scaler}")

    @classmethod
    def from_scheduler_config(cls, cfg: dict) -> "WuerstchenScheduleParams":
        name = cfg.get("_class_name", "DDPMWuerstchenScheduler")
        if name != "DDPMWuerstchenScheduler":
            raise ValueError(f"scheduler_config.json names {name}, not DDPMWuerstchenScheduler")
        return cls(s=float(cfg.get("s", 0.008)), scaler=float(cfg.get("scaler", 1.0)))


def resolve_schedule(root) -> WuerstchenScheduleParams:
    """A snapshot's scheduler/scheduler_config.json (refused when missing: its values are not in the weights);
    ``root`` None (a single file) takes DDPMWuerstchenScheduler's defaults, which are the published values."""
    from pathlib import Path

    from ..loading import CheckpointError, read_json
    if root is None:
        return WuerstchenScheduleParams()
    cfg = Path(root) / "scheduler" / "scheduler_config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{cfg} is missing: it holds this snapshot's noise schedule. Download the "
                              f"repository's scheduler/scheduler_config.json into {cfg.parent}/ again.")
    try:
        return WuerstchenScheduleParams.from_scheduler_config(read_json(cfg))
    except ValueError as e:
        raise CheckpointError(f"{cfg}: {e}") from None


def timesteps(steps: int, schedule: str = "linear") -> torch.Tensor:
    """steps+1 ratios from 1 to 0 (float32, as diffusers holds them).

    linear: torch.linspace(1, 0, steps+1), what the pipelines use for ``num_inference_steps``.
    wuerstchen_default: DEFAULT_STAGE_C_TIMESTEPS generalised: the first 19/29 of the steps spent between 1 and
    2/3, the rest down to 0; with steps=29 it is exactly linspace(1, 2/3, 20) ++ linspace(2/3, 0, 11)[1:].
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if schedule == "linear":
        return torch.linspace(1.0, 0.0, steps + 1)
    if schedule == "wuerstchen_default":
        if steps < 2:
            return torch.linspace(1.0, 0.0, steps + 1)
        first = min(max(1, round(steps * 19 / 29)), steps - 1)
        values = list(np.linspace(1.0, 2 / 3, first + 1)) + list(np.linspace(2 / 3, 0.0, steps - first + 1))[1:]
        return torch.Tensor(values)  # float64 -> float32 the way diffusers' set_timesteps converts a list
    raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")


class WuerstchenDDPM:
    """alpha_bar(t) = cos^2(((t+s)/(1+s)) pi/2) / cos^2((s/(1+s)) pi/2), clamped to [1e-4, 0.9999]."""

    def __init__(self, params: WuerstchenScheduleParams = WuerstchenScheduleParams()):
        self.params = params
        self.s = torch.tensor([params.s])  # float32, as the reference holds it
        self.init_alpha_cumprod = torch.cos(self.s / (1 + self.s) * torch.pi * 0.5) ** 2

    def alpha_cumprod(self, t: torch.Tensor) -> torch.Tensor:
        scaler = self.params.scaler
        if scaler > 1:
            t = 1 - (1 - t) ** scaler
        elif scaler < 1:
            t = t ** scaler
        s = self.s.to(t.device)
        acp = torch.cos((t + s) / (1 + s) * torch.pi * 0.5) ** 2 / self.init_alpha_cumprod.to(t.device)
        return acp.clamp(0.0001, 0.9999)

    def step(self, eps: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, x: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
        """One ancestral step from ratio t to t_prev ([B] tensors) given the noise prediction."""
        shape = (t.shape[0],) + (1,) * (x.ndim - 1)
        acp = self.alpha_cumprod(t).view(shape)
        acp_prev = self.alpha_cumprod(t_prev).view(shape)
        alpha = acp / acp_prev
        mu = (1.0 / alpha).sqrt() * (x - (1 - alpha) * eps / (1 - acp).sqrt())
        std = ((1 - alpha) * (1.0 - acp_prev) / (1.0 - acp)).sqrt() * noise
        return (mu + std * (t_prev != 0).float().view(shape)).to(eps.dtype)


def sample(model_fn: Callable, shape, ts: torch.Tensor, generator: torch.Generator, cfg: float,
           sched: Optional[WuerstchenDDPM] = None, device=None, callback: Optional[Callable] = None) -> torch.Tensor:
    """The pipelines' loop. ``model_fn(x, r)`` returns the noise prediction for x [N,...] (N = B, or 2B as
    [cond; uncond] when cfg > 1, in which case x and r arrive already doubled). Sampling state is fp32.
    ``callback(i, x0_estimate, x)`` runs after each step (x0 from the step's noise prediction, for previews)."""
    sched = sched or WuerstchenDDPM()
    device = device or torch.device("cpu")
    x = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
    guided = cfg > 1
    for i in range(len(ts) - 1):
        t = ts[i].expand(shape[0]).to(device)
        t_prev = ts[i + 1].expand(shape[0]).to(device)
        if guided:
            eps_c, eps_u = model_fn(torch.cat([x, x]), torch.cat([t, t])).float().chunk(2)
            eps = torch.lerp(eps_u, eps_c, cfg)
        else:
            eps = model_fn(x, t).float()
        noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
        x_next = sched.step(eps, t, t_prev, x, noise)
        if callback is not None:
            acp = sched.alpha_cumprod(t).view((shape[0],) + (1,) * (x.ndim - 1))
            callback(i, (x - (1 - acp).sqrt() * eps) / acp.sqrt(), x_next)
        x = x_next
    return x

