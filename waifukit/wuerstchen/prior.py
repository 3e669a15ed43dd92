"""Würstchen v2 Stage C: the text-conditional prior (diffusers ``WuerstchenPrior``), pure torch.

Provenance: architecture from diffusers ``pipelines/deprecated/wuerstchen/modeling_wuerstchen_prior.py`` and
huggingface.co/warp-ai/wuerstchen-prior ``prior/config.json`` (read, not copied).

A flat stack of ``depth`` x (ResBlock, TimestepBlock, AttnBlock) at width ``c`` on a 16-channel latent
(ceil(H/42.67) x ceil(W/42.67)), conditioned on CLIP-bigG ``last_hidden_state`` [B,77,1280] and the noise ratio
r in [0,1]. The output is the noise prediction eps = (x - a) / (|1 - b| + 1e-5).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..loading import CheckpointError, load_component
from ..ops import TorchOps
from ..registry import fetch_hint
from .common import (AttnBlock, LayerNorm2d, ResBlock, TimestepBlock, describe_checkpoint,
                                r_embedding, require_config, split_in_proj, strip_prefix, wrong_family)

PRIOR_HINT = "Stage C is the prior/ folder of warp-ai/wuerstchen-prior. " + fetch_hint("wuerstchen-prior")


# diffusers ``WuerstchenPrior.__init__`` defaults (pipelines/deprecated/wuerstchen/modeling_wuerstchen_prior.py);
# tests/test_wuerstchen_models.py checks them against the installed diffusers.
DIFFUSERS_DEFAULTS = dict(c_in=16, c=1280, c_cond=1024, c_r=64, depth=16, nhead=16)
# The published prior/config.json (warp-ai/wuerstchen-prior), which the snapshot needs.
CONFIG_SOURCE = "warp-ai/wuerstchen-prior prior/config.json"


@dataclass
class WuerstchenPriorParams:
    c_in: int = 16
    c: int = 1536
    c_cond: int = 1280
    c_r: int = 64
    depth: int = 32
    nhead: int = 24
    # Pipeline constants (model_index.json of warp-ai/wuerstchen-prior), kept with the model.
    latent_mean: float = 42.0
    latent_std: float = 1.0
    resolution_multiple: float = 42.67

    def __post_init__(self):
        for name in ("c_in", "c", "c_cond", "c_r", "depth", "nhead"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"prior config: {name} must be positive, got {getattr(self, name)}")
        if self.c % self.nhead:
            raise ValueError(f"prior config: c={self.c} is not divisible by nhead={self.nhead}")
        if self.c_r < 4:
            raise ValueError(f"prior config: c_r={self.c_r} is too small for the sinusoidal r embedding")

    @classmethod
    def from_diffusers_config(cls, cfg: dict, pipeline: dict | None = None) -> "WuerstchenPriorParams":
        if cfg.get("_class_name", "WuerstchenPrior") != "WuerstchenPrior":
            raise ValueError(f"config.json describes a {cfg.get('_class_name')}, not a WuerstchenPrior")
        # A field the file leaves out takes diffusers' default, as WuerstchenPrior.from_config would (those
        # are not the published sizes, so our dataclass defaults must not fill in).
        fields = {k: cfg.get(k, DIFFUSERS_DEFAULTS[k]) for k in DIFFUSERS_DEFAULTS}
        for k in ("latent_mean", "latent_std", "resolution_multiple"):
            if pipeline and k in pipeline:
                fields[k] = float(pipeline[k])
        return cls(**fields)

class WuerstchenPrior(nn.Module):
    def __init__(self, params: WuerstchenPriorParams, operations=TorchOps, dtype=None, device=None):
        super().__init__()
        p = self.params = params
        kw = dict(dtype=dtype, device=device)
        self.projection = operations.Conv2d(p.c_in, p.c, kernel_size=1, **kw)
        self.cond_mapper = nn.Sequential(operations.Linear(p.c_cond, p.c, **kw), nn.LeakyReLU(0.2),
                                         operations.Linear(p.c, p.c, **kw))
        blocks = []
        for _ in range(p.depth):
            blocks += [ResBlock(p.c, operations=operations, **kw), TimestepBlock(p.c, p.c_r, operations, **kw),
                       AttnBlock(p.c, p.c, p.nhead, operations, **kw)]
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Sequential(LayerNorm2d(), operations.Conv2d(p.c, p.c_in * 2, kernel_size=1, **kw))

    def forward(self, x: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x [B,c_in,h,w] noisy latent, r [B] noise ratio, c [B,L,c_cond] text states -> eps [B,c_in,h,w]."""
        if x.ndim != 4 or x.shape[1] != self.params.c_in:
            raise ValueError(f"Stage C expects latents [B,{self.params.c_in},h,w], got {tuple(x.shape)}")
        if c.ndim != 3 or c.shape[-1] != self.params.c_cond:
            raise ValueError(f"Stage C expects text states [B,L,{self.params.c_cond}] (CLIP-bigG last_hidden_state "
                             f"from the prior snapshot's text encoder), got {tuple(c.shape)}")
        x_in = x
        x = self.projection(x)
        c_embed = self.cond_mapper(c)
        r_embed = r_embedding(r, self.params.c_r).to(x.dtype)
        for block in self.blocks:
            if isinstance(block, AttnBlock):
                x = block(x, c_embed)
            elif isinstance(block, TimestepBlock):
                x = block(x, r_embed)
            else:
                x = block(x)
        a, b = self.out(x).chunk(2, dim=1)
        return (x_in - a) / ((1 - b).abs() + 1e-5)


def to_native_layout(sd: dict) -> dict:
    """diffusers keys as they are; original checkpoints (``ema_state_dict`` / in_proj attention) converted.
    ValueError for anything that is not a Würstchen v2 prior."""
    sd = split_in_proj(strip_prefix(sd))
    if "cond_mapper.0.weight" not in sd or "projection.weight" not in sd or "blocks.0.depthwise.weight" not in sd:
        raise ValueError(f"this is {describe_checkpoint(sd)}")
    return sd


def resolve_prior(path: Path):
    """(params, state dict, weights file) for a prior file, the prior/ folder, or the snapshot root."""
    sd, cfg, weights = load_component(path, "prior", fetch_hint("wuerstchen-prior"))
    try:
        sd = to_native_layout(sd)
    except ValueError:
        raise wrong_family(weights, "a Würstchen v2 Stage C prior", sd, "Use it with the matching loader; "
                           + PRIOR_HINT) from None
    # Pipeline constants: a snapshot's model_index.json; a single file takes diffusers' pipeline defaults,
    # which are the published values.
    pipeline = None
    root = weights.parent.parent if weights.parent.name == "prior" else None
    if root is not None:
        if not (root / "model_index.json").is_file():
            raise CheckpointError(f"{root / 'model_index.json'} is missing: it holds the pipeline constants of this "
                                  f"snapshot. Download {CONFIG_SOURCE.split()[0]} model_index.json into {root}/ again.")
        from ..loading import read_json
        pipeline = read_json(root / "model_index.json")
    cfg = require_config(cfg, path, weights, "prior", "the attention head count (nhead)", CONFIG_SOURCE)
    try:
        params = WuerstchenPriorParams.from_diffusers_config(cfg, pipeline)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{weights}: unsupported Stage C config: {e}") from None
    return params, sd, weights
