"""Latent -> RGB preview factors derived from a VAE itself, so previews need no hand-copied table.

Decode a handful of spatially constant latents and fit, by least squares, the affine map from a latent vector
(in the model's scaled latent space, where previews read x0) to the colour the VAE paints for it.
"""
from __future__ import annotations

from typing import Callable

import torch


@torch.no_grad()
def fit_latent_rgb(decode: Callable[[torch.Tensor], torch.Tensor], channels: int, scale_factor: float,
                   shift_factor: float = 0.0, samples: int = 48, size: int = 4, seed: int = 0,
                   device=None, dtype=torch.float32) -> tuple[list[list[float]], list[float]]:
    """Return (factors [channels][3], bias [3]) with rgb ~= latent @ factors + bias, rgb in [-1, 1].

    ``decode`` maps raw VAE latents [B,C,h,w] to pixels [B,3,8h,8w] in [-1, 1]. Latents are drawn N(0,1) in
    model space (raw = x / scale_factor + shift_factor), held constant over a ``size`` x ``size`` map; the
    centre pixel's colour is the target (the border is where padding shows).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, channels, generator=g)
    raw = (x / scale_factor + shift_factor)[:, :, None, None].expand(-1, -1, size, size)
    pixels = decode(raw.to(device=device, dtype=dtype)).float().cpu()
    h, w = pixels.shape[-2:]
    rgb = pixels[:, :, h // 2 - 2:h // 2 + 2, w // 2 - 2:w // 2 + 2].mean(dim=(2, 3))   # [samples, 3]
    design = torch.cat([x, torch.ones(samples, 1)], dim=1).double()
    solution = torch.linalg.lstsq(design, rgb.double()).solution                       # [channels + 1, 3]
    return solution[:channels].float().tolist(), solution[channels].float().tolist()
