"""Würstchen v2 Stage B: the decoder diffusion model (diffusers ``WuerstchenDiffNeXt``), pure torch.

Provenance: architecture from diffusers ``pipelines/deprecated/wuerstchen/modeling_wuerstchen_diffnext.py`` and
huggingface.co/warp-ai/wuerstchen ``decoder/config.json`` (read, not copied).

A 4-level UNet on 4-channel VQGAN latents (H/4 x W/4), patch 2. Every ResBlock at levels that inject the Stage C
embeddings ("effnet") concatenates them, bicubically resized to the level's size and mapped to ``c_cond``
channels; attention blocks attend to the mapped CLIP-H ``last_hidden_state``. Output: eps = (x - a) / b.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..loading import CheckpointError, load_component
from ..ops import TorchOps
from ..registry import fetch_hint
from .common import (AttnBlock, LayerNorm2d, ResBlockStageB, TimestepBlock, conv_transpose,
                                describe_checkpoint, r_embedding, require_config, split_in_proj, strip_prefix,
                                wrong_family)

DECODER_HINT = "Stage B is the decoder/ folder of warp-ai/wuerstchen. " + fetch_hint("wuerstchen")

CONFIG_SOURCE = "warp-ai/wuerstchen decoder/config.json"


# The defaults are the published decoder/config.json values, which are also diffusers' WuerstchenDiffNeXt
# defaults (checked in tests/test_wuerstchen_models.py), so a field a config leaves out is read as diffusers does.
@dataclass
class DiffNeXtParams:
    c_in: int = 4
    c_out: int = 4
    c_r: int = 64
    patch_size: int = 2
    c_cond: int = 1024
    c_hidden: list = field(default_factory=lambda: [320, 640, 1280, 1280])
    nhead: list = field(default_factory=lambda: [-1, 10, 20, 20])
    blocks: list = field(default_factory=lambda: [4, 4, 14, 4])
    level_config: list = field(default_factory=lambda: ["CT", "CTA", "CTA", "CTA"])
    inject_effnet: list = field(default_factory=lambda: [False, True, True, True])
    effnet_embd: int = 16
    clip_embd: int = 1024
    kernel_size: int = 3
    latent_dim_scale: float = 10.67  # Stage C size -> Stage B size (pipeline constant of warp-ai/wuerstchen)

    def __post_init__(self):
        n = len(self.c_hidden)
        for name in ("nhead", "blocks", "level_config", "inject_effnet"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"decoder config: {name} has {len(getattr(self, name))} levels, c_hidden has {n}")
        for i, cfg in enumerate(self.level_config):
            if set(cfg) - set("CTA"):
                raise ValueError(f"decoder config: level_config[{i}]={cfg!r} has block types other than C/T/A")
            if "A" in cfg and (self.nhead[i] <= 0 or self.c_hidden[i] % self.nhead[i]):
                raise ValueError(f"decoder config: level {i} has attention but nhead={self.nhead[i]} does not "
                                 f"divide c_hidden={self.c_hidden[i]}")
        if self.patch_size <= 0 or self.c_in <= 0 or self.c_out <= 0:
            raise ValueError("decoder config: c_in, c_out and patch_size must be positive")

    @property
    def size_multiple(self) -> int:
        """Stage B latent sides must be multiples of this (patch + one 2x downsampling per extra level)."""
        return self.patch_size * 2 ** (len(self.c_hidden) - 1)

    @classmethod
    def from_diffusers_config(cls, cfg: dict, pipeline: dict | None = None) -> "DiffNeXtParams":
        if cfg.get("_class_name", "WuerstchenDiffNeXt") != "WuerstchenDiffNeXt":
            raise ValueError(f"config.json describes a {cfg.get('_class_name')}, not a WuerstchenDiffNeXt")
        names = ("c_in", "c_out", "c_r", "patch_size", "c_cond", "c_hidden", "nhead", "blocks", "level_config",
                 "inject_effnet", "effnet_embd", "clip_embd", "kernel_size")
        fields = {k: (list(cfg[k]) if isinstance(cfg[k], (list, tuple)) else cfg[k]) for k in names if k in cfg}
        if pipeline and "latent_dim_scale" in pipeline:
            fields["latent_dim_scale"] = float(pipeline["latent_dim_scale"])
        return cls(**fields)


class WuerstchenDiffNeXt(nn.Module):
    def __init__(self, params: DiffNeXtParams, operations=TorchOps, dtype=None, device=None):
        super().__init__()
        p = self.params = params
        kw = dict(dtype=dtype, device=device)
        n = len(p.c_hidden)
        self.clip_mapper = operations.Linear(p.clip_embd, p.c_cond, **kw)
        # 2n entries: down levels 0..n-1, then up levels n-1..0; None where that level does not inject.
        self.effnet_mappers = nn.ModuleList([
            operations.Conv2d(p.effnet_embd, p.c_cond, kernel_size=1, **kw) if inject else None
            for inject in list(p.inject_effnet) + list(reversed(p.inject_effnet))])
        self.embedding = nn.Sequential(nn.PixelUnshuffle(p.patch_size),
                                       operations.Conv2d(p.c_in * p.patch_size ** 2, p.c_hidden[0], kernel_size=1, **kw),
                                       LayerNorm2d())

        def block(kind, i, c_skip):
            c = p.c_hidden[i]
            if kind == "C":
                return ResBlockStageB(c, c_skip, kernel_size=p.kernel_size, operations=operations, **kw)
            if kind == "A":
                return AttnBlock(c, p.c_cond, p.nhead[i], operations, **kw)
            return TimestepBlock(c, p.c_r, operations, **kw)

        self.down_blocks = nn.ModuleList()
        for i in range(n):
            level = nn.ModuleList()
            if i > 0:
                level.append(nn.Sequential(LayerNorm2d(), operations.Conv2d(p.c_hidden[i - 1], p.c_hidden[i],
                                                                            kernel_size=2, stride=2, **kw)))
            for _ in range(p.blocks[i]):
                for kind in p.level_config[i]:
                    level.append(block(kind, i, p.c_cond if p.inject_effnet[i] else 0))
            self.down_blocks.append(level)

        self.up_blocks = nn.ModuleList()
        for i in reversed(range(n)):
            level = nn.ModuleList()
            for j in range(p.blocks[i]):
                for k, kind in enumerate(p.level_config[i]):
                    # The first block of every level below the bottom also takes that level's down output.
                    c_skip = p.c_hidden[i] if i < n - 1 and j == k == 0 else 0
                    c_skip += p.c_cond if p.inject_effnet[i] else 0
                    level.append(block(kind, i, c_skip))
            if i > 0:
                level.append(nn.Sequential(LayerNorm2d(), conv_transpose(operations)(
                    p.c_hidden[i], p.c_hidden[i - 1], kernel_size=2, stride=2, **kw)))
            self.up_blocks.append(level)

        self.clf = nn.Sequential(LayerNorm2d(),
                                 operations.Conv2d(p.c_hidden[0], 2 * p.c_out * p.patch_size ** 2, kernel_size=1, **kw),
                                 nn.PixelShuffle(p.patch_size))

    def _effnet(self, index, effnet, x):
        mapper = self.effnet_mappers[index]
        if mapper is None:
            return None
        # Resized in fp32, as the reference does (bicubic + antialias is not implemented for half on all devices).
        resized = F.interpolate(effnet.float(), size=x.shape[-2:], mode="bicubic", antialias=True, align_corners=True)
        return mapper(resized.to(x.dtype))

    def forward(self, x: torch.Tensor, r: torch.Tensor, effnet: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
        """x [B,c_in,H,W] noisy latent, r [B], effnet [B,16,h,w] Stage C embeddings, clip [B,L,clip_embd]."""
        p = self.params
        m = p.size_multiple
        if x.ndim != 4 or x.shape[1] != p.c_in:
            raise ValueError(f"Stage B expects latents [B,{p.c_in},H,W], got {tuple(x.shape)}")
        if x.shape[-2] % m or x.shape[-1] % m:
            raise ValueError(f"Stage B latent sides must be multiples of {m}; got {tuple(x.shape[-2:])}")
        if effnet.ndim != 4 or effnet.shape[1] != p.effnet_embd:
            raise ValueError(f"Stage B expects Stage C embeddings [B,{p.effnet_embd},h,w], got {tuple(effnet.shape)}")
        if clip.ndim != 3 or clip.shape[-1] != p.clip_embd:
            raise ValueError(f"Stage B expects text states [B,L,{p.clip_embd}] (CLIP-H last_hidden_state from the "
                             f"decoder snapshot's text encoder), got {tuple(clip.shape)}")
        r_embed = r_embedding(r, p.c_r).to(x.dtype)
        clip = F.layer_norm(self.clip_mapper(clip), (p.c_cond,), eps=1e-6)
        x_in = x
        x = self.embedding(x)

        levels = []
        for i, level in enumerate(self.down_blocks):
            eff = None
            for blk in level:
                if eff is None and isinstance(blk, ResBlockStageB):
                    eff = self._effnet(i, effnet, x)  # after this level's downsampling
                x = self._run_block(blk, x, r_embed, clip, eff)
            levels.insert(0, x)

        x = levels[0]
        n = len(self.down_blocks)
        for i, level in enumerate(self.up_blocks):
            eff = self._effnet(n + i, effnet, x)
            for j, blk in enumerate(level):
                if isinstance(blk, ResBlockStageB):
                    skip = levels[i] if j == 0 and i > 0 else None
                    if eff is not None:
                        skip = eff if skip is None else torch.cat([skip, eff], dim=1)
                    x = blk(x, skip)
                else:
                    x = self._run_block(blk, x, r_embed, clip, None)
        a, b = self.clf(x).chunk(2, dim=1)
        b = b.sigmoid() * (1 - 2e-3) + 1e-3
        return (x_in - a) / b

    @staticmethod
    def _run_block(blk, x, r_embed, clip, eff):
        if isinstance(blk, ResBlockStageB):
            return blk(x, eff)
        if isinstance(blk, AttnBlock):
            return blk(x, clip)
        if isinstance(blk, TimestepBlock):
            return blk(x, r_embed)
        return blk(x)


def to_native_layout(sd: dict) -> dict:
    sd = split_in_proj(strip_prefix(sd))
    if "clip_mapper.weight" not in sd or not any(k.startswith("effnet_mappers.") for k in sd) \
            or "embedding.1.weight" not in sd:
        raise ValueError(f"this is {describe_checkpoint(sd)}")
    return sd


def resolve_decoder(path: Path):
    """(params, state dict, weights file) for a decoder file, the decoder/ folder, or the snapshot root."""
    sd, cfg, weights = load_component(path, "decoder", fetch_hint("wuerstchen"))
    try:
        sd = to_native_layout(sd)
    except ValueError:
        raise wrong_family(weights, "a Würstchen v2 Stage B decoder", sd, "Use it with the matching loader; "
                           + DECODER_HINT) from None
    # Pipeline constants: a snapshot's model_index.json; a single file takes diffusers' pipeline defaults,
    # which are the published values.
    pipeline = None
    root = weights.parent.parent if weights.parent.name == "decoder" else None
    if root is not None:
        if not (root / "model_index.json").is_file():
            raise CheckpointError(f"{root / 'model_index.json'} is missing: it holds the pipeline constants of this "
                                  f"snapshot. Download {CONFIG_SOURCE.split()[0]} model_index.json into {root}/ again.")
        from ..loading import read_json
        pipeline = read_json(root / "model_index.json")
    cfg = require_config(cfg, path, weights, "decoder", "the attention head counts (nhead) and the block pattern",
                         CONFIG_SOURCE)
    try:
        params = DiffNeXtParams.from_diffusers_config(cfg, pipeline)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{weights}: unsupported Stage B config: {e}") from None
    return params, sd, weights
