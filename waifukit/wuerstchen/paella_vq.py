"""Würstchen Stage A: the Paella VQGAN (diffusers ``PaellaVQModel``), pure torch.

Provenance: architecture from diffusers ``pipelines/deprecated/wuerstchen/modeling_paella_vq_model.py`` and
huggingface.co/warp-ai/wuerstchen ``vqgan/config.json`` (read, not copied).

Pixels are in [0,1]. ``decode`` never quantises (the reference calls ``decode(force_not_quantize=True)``): it
takes Stage B latents multiplied by ``scale_factor`` (0.3764). ``encode`` returns the BatchNorm output
(Stage-B space = that / scale_factor).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..loading import CheckpointError, load_component
from ..ops import TorchOps, cast_like
from ..registry import fetch_hint
from .common import conv_transpose, describe_checkpoint, require_config, strip_prefix, wrong_family

VQGAN_HINT = "Stage A is the vqgan/ folder of warp-ai/wuerstchen. " + fetch_hint("wuerstchen")

CONFIG_SOURCE = "warp-ai/wuerstchen vqgan/config.json"


# Defaults = diffusers' PaellaVQModel defaults = the published vqgan/config.json (checked in the tests).
@dataclass
class PaellaVQParams:
    in_channels: int = 3
    out_channels: int = 3
    up_down_scale_factor: int = 2
    levels: int = 2
    bottleneck_blocks: int = 12
    embed_dim: int = 384
    latent_channels: int = 4
    num_vq_embeddings: int = 8192
    scale_factor: float = 0.3764

    def __post_init__(self):
        if self.levels < 1 or self.embed_dim % (2 ** (self.levels - 1)):
            raise ValueError(f"VQGAN config: embed_dim {self.embed_dim} cannot be halved over {self.levels} levels")
        if self.scale_factor <= 0:
            raise ValueError(f"VQGAN config: scale_factor must be positive, got {self.scale_factor}")

    @property
    def c_levels(self) -> list:
        return [self.embed_dim // 2 ** i for i in reversed(range(self.levels))]

    @property
    def downscale(self) -> int:
        return self.up_down_scale_factor * 2 ** (self.levels - 1)

    @classmethod
    def from_diffusers_config(cls, cfg: dict) -> "PaellaVQParams":
        if cfg.get("_class_name", "PaellaVQModel") != "PaellaVQModel":
            raise ValueError(f"config.json describes a {cfg.get('_class_name')}, not a PaellaVQModel")
        names = ("in_channels", "out_channels", "up_down_scale_factor", "levels", "bottleneck_blocks", "embed_dim",
                 "latent_channels", "num_vq_embeddings", "scale_factor")
        return cls(**{k: cfg[k] for k in names if k in cfg})


class MixingResidualBlock(nn.Module):
    def __init__(self, c, c_hidden, operations=TorchOps, dtype=None, device=None):
        super().__init__()
        # ReplicationPad (index 0) then a valid depthwise conv: keys depthwise.1.*
        self.depthwise = nn.Sequential(nn.ReplicationPad2d(1), operations.Conv2d(c, c, kernel_size=3, groups=c,
                                                                                 dtype=dtype, device=device))
        self.channelwise = nn.Sequential(operations.Linear(c, c_hidden, dtype=dtype, device=device), nn.GELU(),
                                         operations.Linear(c_hidden, c, dtype=dtype, device=device))
        self.gammas = nn.Parameter(torch.zeros(6, dtype=dtype, device=device))

    def forward(self, x):
        g = cast_like(self.gammas, x)
        c = x.shape[1]
        t = F.layer_norm(x.permute(0, 2, 3, 1), (c,), eps=1e-6).permute(0, 3, 1, 2) * (1 + g[0]) + g[1]
        x = x + self.depthwise(t) * g[2]
        t = F.layer_norm(x.permute(0, 2, 3, 1), (c,), eps=1e-6) * (1 + g[3]) + g[4]
        return x + self.channelwise(t).permute(0, 3, 1, 2) * g[5]


class _Codebook(nn.Module):
    """Holds ``vquantizer.embedding.weight`` (unused at decode; kept so the files load strictly)."""

    def __init__(self, n, dim, dtype=None, device=None):
        super().__init__()
        self.embedding = nn.Embedding(n, dim, dtype=dtype, device=device)


class PaellaVQ(nn.Module):
    def __init__(self, params: PaellaVQParams, operations=TorchOps, dtype=None, device=None):
        super().__init__()
        p = self.params = params
        kw = dict(dtype=dtype, device=device)
        c = p.c_levels
        s = p.up_down_scale_factor
        self.in_block = nn.Sequential(nn.PixelUnshuffle(s), operations.Conv2d(p.in_channels * s * s, c[0], 1, **kw))
        down = []
        for i in range(p.levels):
            if i > 0:
                down.append(operations.Conv2d(c[i - 1], c[i], kernel_size=4, stride=2, padding=1, **kw))
            down.append(MixingResidualBlock(c[i], c[i] * 4, operations, **kw))
        down.append(nn.Sequential(operations.Conv2d(c[-1], p.latent_channels, 1, bias=False, **kw),
                                  nn.BatchNorm2d(p.latent_channels, **kw)))
        self.down_blocks = nn.Sequential(*down)
        self.vquantizer = _Codebook(p.num_vq_embeddings, p.latent_channels, **kw)
        up = [nn.Sequential(operations.Conv2d(p.latent_channels, c[-1], 1, **kw))]
        for i in range(p.levels):
            ch = c[p.levels - 1 - i]
            for _ in range(p.bottleneck_blocks if i == 0 else 1):
                up.append(MixingResidualBlock(ch, ch * 4, operations, **kw))
            if i < p.levels - 1:
                up.append(conv_transpose(operations)(ch, c[p.levels - 2 - i], kernel_size=4, stride=2, padding=1, **kw))
        self.up_blocks = nn.Sequential(*up)
        self.out_block = nn.Sequential(operations.Conv2d(c[0], p.out_channels * s * s, 1, **kw), nn.PixelShuffle(s))

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        """VQ-space latents (Stage B latents * scale_factor) -> pixels, unclamped, ~[0,1]."""
        if h.ndim != 4 or h.shape[1] != self.params.latent_channels:
            raise ValueError(f"Stage A expects latents [B,{self.params.latent_channels},H/4,W/4] from Stage B, "
                             f"got {tuple(h.shape)}")
        return self.out_block(self.up_blocks(h))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels [B,3,H,W] in [0,1] -> VQ-space latents (divide by scale_factor for Stage B space)."""
        m = self.params.downscale
        if x.shape[-2] % m or x.shape[-1] % m:
            raise ValueError(f"Stage A encodes images whose sides are multiples of {m}; got {tuple(x.shape[-2:])}")
        return self.down_blocks(self.in_block(x))


def to_native_layout(sd: dict) -> dict:
    sd = strip_prefix(sd, ("model.", "module.", "first_stage_model."))
    # The original / Stable Cascade Stage A names the codebook ``vquantizer.codebook``.
    if "vquantizer.codebook.weight" in sd:
        sd = {("vquantizer.embedding.weight" if k == "vquantizer.codebook.weight" else k): v for k, v in sd.items()}
    if "in_block.1.weight" not in sd or "vquantizer.embedding.weight" not in sd or "out_block.0.weight" not in sd:
        raise ValueError(f"this is {describe_checkpoint(sd)}")
    return sd


def resolve_vqgan(path: Path):
    sd, cfg, weights = load_component(path, "vqgan", fetch_hint("wuerstchen"))
    try:
        sd = to_native_layout(sd)
    except ValueError:
        raise wrong_family(weights, "a Würstchen Stage A (Paella VQGAN)", sd, "Use it with the matching loader; "
                           + VQGAN_HINT) from None
    # scale_factor (0.3764 here, 0.43 in Stable Cascade's ComfyUI Stage A) is not in the weights.
    cfg = require_config(cfg, path, weights, "vqgan", "the latent scale_factor", CONFIG_SOURCE)
    try:
        params = PaellaVQParams.from_diffusers_config(cfg)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{weights}: unsupported Stage A config: {e}") from None
    return params, sd, weights
