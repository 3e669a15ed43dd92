"""The LATENT conventions ComfyUI's KSampler honours, in pure torch, so our samplers honour them too.

- ``batch_index`` (set by the stock "Latent From Batch" / "Repeat Latent Batch" nodes): the initial noise of
  image k is the k-th of a run of single-image draws on the seeded generator, so one image of a batch can be
  reproduced alone (comfy/sample.py ``prepare_noise``). Without it the batch is one draw, as before.
- ``noise_mask`` (the stock "Set Latent Noise Mask"): resized to the latent as comfy/utils.py ``reshape_mask``
  does (bilinear, channels and batch repeated); 1 = resample, 0 = keep the input latent.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def batch_noise(shape, generator: torch.Generator, batch_index: Optional[Sequence[int]] = None) -> torch.Tensor:
    """float32 CPU noise of ``shape`` from ``generator``: one draw for the batch, or with ``batch_index`` one
    [1, ...] draw per index up to the largest, image i taking the draw of its index."""
    if batch_index is None:
        return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    index = [int(i) for i in batch_index]
    if len(index) != shape[0]:
        raise ValueError(f"LATENT batch_index has {len(index)} entries for a batch of {shape[0]}")
    if min(index) < 0:
        raise ValueError(f"LATENT batch_index has a negative entry: {index}")
    wanted = set(index)
    draws = {}
    for i in range(max(index) + 1):
        one = torch.randn((1, *shape[1:]), generator=generator, dtype=torch.float32)
        if i in wanted:
            draws[i] = one
    return torch.cat([draws[i] for i in index])


def seeded_noise(shape, seed: int, batch_index: Optional[Sequence[int]] = None) -> torch.Tensor:
    return batch_noise(shape, torch.Generator("cpu").manual_seed(int(seed)), batch_index)


def _repeat_to_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    if t.shape[0] > batch:
        return t[:batch]
    if t.shape[0] < batch:
        return t.repeat([math.ceil(batch / t.shape[0])] + [1] * (t.ndim - 1))[:batch]
    return t


def latent_mask(mask: torch.Tensor, shape) -> torch.Tensor:
    """A noise_mask ([H,W], [B,H,W] or [B,1,H,W], any resolution) as a float32 [B,C,h,w] mask for latents of
    ``shape``."""
    if mask.ndim < 2:
        raise ValueError(f"LATENT noise_mask has shape {tuple(mask.shape)}; expected [B,1,H,W] (Set Latent Noise Mask)")
    m = mask.float().reshape(-1, 1, mask.shape[-2], mask.shape[-1])
    m = F.interpolate(m, size=tuple(shape[2:]), mode="bilinear")
    if m.shape[1] < shape[1]:
        m = m.repeat(1, shape[1], 1, 1)[:, :shape[1]]
    return _repeat_to_batch(m, shape[0])


def batch_index_of(latent: Optional[dict]):
    """The LATENT's batch_index as a list, or None."""
    if latent is None or latent.get("batch_index") is None:
        return None
    return list(np.asarray(latent["batch_index"]).reshape(-1).tolist())
