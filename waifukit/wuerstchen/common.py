"""Blocks shared by Würstchen v2 Stage C (prior) and Stage B (decoder), plus checkpoint plumbing for the family.

Provenance: written from the architecture in diffusers' ``pipelines/deprecated/wuerstchen/
modeling_wuerstchen_common.py`` / ``modeling_wuerstchen_diffnext.py`` (read, not copied) and the published
configs of huggingface.co/warp-ai/wuerstchen-prior and warp-ai/wuerstchen. Parameter names follow the diffusers
layout so that the published ``diffusion_pytorch_model.safetensors`` files load without renaming.

All norms in these models are non-affine, so they carry no parameters and are plain functions here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..loading import CheckpointError
from ..ops import TorchOps, cast_like


@dataclass
class BlockParams:
    """Geometry shared by every block (nothing here is read from a checkpoint: the blocks are fixed)."""
    norm_eps: float = 1e-6
    r_max_positions: int = 10000


EPS = BlockParams().norm_eps


def conv_transpose(operations):
    # waifukit.ops.TorchOps has no ConvTranspose2d; ComfyUI's comfy.ops classes do.
    return getattr(operations, "ConvTranspose2d", nn.ConvTranspose2d)


def layer_norm_2d(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Non-affine LayerNorm over channels of an NCHW tensor (diffusers' WuerstchenLayerNorm)."""
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), eps=eps).permute(0, 3, 1, 2)


class LayerNorm2d(nn.Module):
    """Parameter-free module form, so Sequential indices (and hence checkpoint keys) line up."""

    def forward(self, x):
        return layer_norm_2d(x)


def r_embedding(r: torch.Tensor, c_r: int, max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of the noise ratio r in [0,1] ([B] -> [B,c_r]).

    Computed in fp32 whatever the model dtype: r*10000 in bf16 would round the ratio to a handful of values
    (diffusers computes it in the model dtype; identical in fp32)."""
    r = r.float() * max_positions
    half = c_r // 2
    freq = torch.arange(half, device=r.device).float().mul(-math.log(max_positions) / (half - 1)).exp()
    emb = r[:, None] * freq[None, :]
    emb = torch.cat([emb.sin(), emb.cos()], dim=1)
    if c_r % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN on NHWC tensors: gamma/beta shaped [1,1,1,C] as in the checkpoints."""

    def __init__(self, dim, dtype=None, device=None):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim, dtype=dtype, device=device))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim, dtype=dtype, device=device))

    def forward(self, x):
        agg = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        n = agg / (agg.mean(dim=-1, keepdim=True) + 1e-6)
        return cast_like(self.gamma, x) * (x * n) + cast_like(self.beta, x) + x


def _channelwise(c_in, c, operations, dtype, device):
    # Indices 0..4 match the checkpoints (1 = GELU, 3 = the inference-time no-op Dropout).
    return nn.Sequential(operations.Linear(c_in, c * 4, dtype=dtype, device=device), nn.GELU(),
                         GlobalResponseNorm(c * 4, dtype=dtype, device=device), nn.Identity(),
                         operations.Linear(c * 4, c, dtype=dtype, device=device))


class ResBlock(nn.Module):
    """Stage C residual block: skip (if any) concatenated before the depthwise conv."""

    def __init__(self, c, c_skip=0, kernel_size=3, operations=TorchOps, dtype=None, device=None):
        super().__init__()
        self.depthwise = operations.Conv2d(c + c_skip, c, kernel_size=kernel_size, padding=kernel_size // 2,
                                           groups=c, dtype=dtype, device=device)
        self.channelwise = _channelwise(c, c, operations, dtype, device)

    def forward(self, x, x_skip=None):
        res = x
        if x_skip is not None:
            x = torch.cat([x, x_skip], dim=1)
        x = layer_norm_2d(self.depthwise(x)).permute(0, 2, 3, 1)
        return self.channelwise(x).permute(0, 3, 1, 2) + res


class ResBlockStageB(nn.Module):
    """Stage B residual block: skip concatenated after the norm, widening the first channelwise Linear."""

    def __init__(self, c, c_skip=0, kernel_size=3, operations=TorchOps, dtype=None, device=None):
        super().__init__()
        self.depthwise = operations.Conv2d(c, c, kernel_size=kernel_size, padding=kernel_size // 2, groups=c,
                                           dtype=dtype, device=device)
        self.channelwise = _channelwise(c + c_skip, c, operations, dtype, device)

    def forward(self, x, x_skip=None):
        res = x
        x = layer_norm_2d(self.depthwise(x))
        if x_skip is not None:
            x = torch.cat([x, x_skip], dim=1)
        return self.channelwise(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) + res


class TimestepBlock(nn.Module):
    def __init__(self, c, c_r, operations=TorchOps, dtype=None, device=None):
        super().__init__()
        self.mapper = operations.Linear(c_r, c * 2, dtype=dtype, device=device)

    def forward(self, x, r_embed):
        a, b = self.mapper(r_embed)[:, :, None, None].chunk(2, dim=1)
        return x * (1 + a) + b


class Attention(nn.Module):
    """Multi-head attention with biased q/k/v/out projections (diffusers ``Attention`` key names)."""

    def __init__(self, c, nhead, operations=TorchOps, dtype=None, device=None):
        super().__init__()
        if c % nhead:
            raise ValueError(f"attention width {c} is not divisible by {nhead} heads")
        self.nhead = nhead
        self.to_q = operations.Linear(c, c, dtype=dtype, device=device)
        self.to_k = operations.Linear(c, c, dtype=dtype, device=device)
        self.to_v = operations.Linear(c, c, dtype=dtype, device=device)
        self.to_out = nn.ModuleList([operations.Linear(c, c, dtype=dtype, device=device)])

    def forward(self, x, kv):
        b, n, c = x.shape
        h = self.nhead
        q = self.to_q(x).view(b, n, h, c // h).transpose(1, 2)
        k = self.to_k(kv).view(b, kv.shape[1], h, c // h).transpose(1, 2)
        v = self.to_v(kv).view(b, kv.shape[1], h, c // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, c))


class AttnBlock(nn.Module):
    """Self+cross attention: queries are the image tokens, keys/values the image tokens followed by the
    mapped text tokens. No text padding mask (the reference passes none)."""

    def __init__(self, c, c_cond, nhead, operations=TorchOps, dtype=None, device=None):
        super().__init__()
        self.attention = Attention(c, nhead, operations, dtype, device)
        self.kv_mapper = nn.Sequential(nn.SiLU(), operations.Linear(c_cond, c, dtype=dtype, device=device))

    def forward(self, x, cond):
        kv = self.kv_mapper(cond)
        b, c, h, w = x.shape
        tokens = layer_norm_2d(x).reshape(b, c, h * w).transpose(1, 2)
        out = self.attention(tokens, torch.cat([tokens, kv], dim=1))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


def split_in_proj(sd: dict) -> dict:
    """Original (dome272 / Stable-Cascade-style) checkpoints keep nn.MultiheadAttention weights:
    ``attention.attn.in_proj_*`` (q,k,v stacked) and ``attention.attn.out_proj``; map them to our names."""
    if not any(".attention.attn." in k for k in sd):
        return sd
    out = {}
    for k, v in sd.items():
        if ".attention.attn.in_proj_" in k:
            base, kind = k.split(".attention.attn.in_proj_")
            for name, part in zip(("to_q", "to_k", "to_v"), v.chunk(3, dim=0)):
                out[f"{base}.attention.{name}.{kind}"] = part
        elif ".attention.attn.out_proj." in k:
            out[k.replace(".attention.attn.out_proj.", ".attention.to_out.0.")] = v
        else:
            out[k] = v
    return out


def strip_prefix(sd: dict, prefixes=("model.", "module.", "diffusion_model.")) -> dict:
    for p in prefixes:
        if sd and all(k.startswith(p) for k in sd):
            return {k[len(p):]: v for k, v in sd.items()}
    return sd


# ---------------------------------------------------------------------------------------------------------------
# Family detection, so that every loader can say what it was given instead of listing missing keys.

def describe_checkpoint(sd: dict) -> str:
    """A human name for what a state dict holds (best effort; 'unknown' when nothing matches)."""
    keys = set(sd)

    def has(*names):
        return all(any(k == n or k.endswith("." + n) or k.startswith(n) for k in keys) for n in names)

    if has("cond_mapper.0.weight") and any(k.startswith("blocks.") for k in keys):
        return "a Würstchen v2 Stage C prior (warp-ai/wuerstchen-prior prior/)"
    if has("clip_mapper.weight") and any(k.startswith("effnet_mappers.") for k in keys):
        return "a Würstchen v2 Stage B decoder (warp-ai/wuerstchen decoder/)"
    if any(k.startswith("in_block.") for k in keys) and any(k.startswith("vquantizer.") for k in keys):
        return "a Paella VQGAN / Stage A (warp-ai/wuerstchen vqgan/)"
    if has("clip_txt_mapper.weight") or has("clip_txt_pooled_mapper.weight"):
        return "a Stable Cascade (Würstchen v3) Stage C"
    if any(k.startswith("effnet_mapper.") for k in keys) and has("clf.1.weight"):
        return "a Stable Cascade (Würstchen v3) Stage B"
    if any("token_embedding" in k for k in keys):
        return "a CLIP text encoder"
    if any("transformer_blocks" in k for k in keys) or any(k.startswith("caption_projection") for k in keys):
        return "a DiT transformer"
    if any(k.startswith(("encoder.down_blocks", "decoder.up_blocks", "encoder.down.", "decoder.up.")) for k in keys):
        return "an AutoencoderKL VAE"
    if any("input_blocks" in k or "down_blocks.0.resnets" in k for k in keys):
        return "a Stable Diffusion UNet"
    if any(k.startswith(("embeddings.word_embeddings", "roberta.", "encoder.layer.")) for k in keys):
        return "a BERT/XLM-R text encoder"
    return f"an unknown checkpoint (keys like {sorted(keys)[:3]})"


def wrong_family(weights: Path, wanted: str, sd: dict, hint: str) -> CheckpointError:
    return CheckpointError(f"{weights}: this is {describe_checkpoint(sd)}, not {wanted}. {hint}")


def require_config(cfg, path: Path, weights: Path, sub: str, missing_what: str, source: str) -> dict:
    """The component's config.json, or ``<stem>.json`` beside a single file; else a CheckpointError that names
    the file to put where. ``missing_what`` says which values the weights do not pin down (so nothing is
    guessed); ``source`` is the published file to copy (e.g. "warp-ai/wuerstchen decoder/config.json")."""
    if cfg is not None:
        return cfg
    from ..loading import read_json
    if Path(path).is_dir() or weights.parent.name == sub:
        # A snapshot folder that lost its config.json: the fix is to fetch that one file again.
        raise CheckpointError(f"{weights.parent / 'config.json'} is missing: {missing_what} are not stored in "
                              f"{weights.name}, so it cannot be loaded without it. Download {source} into "
                              f"{weights.parent}/ again.")
    side = weights.parent / f"{weights.name.split('.')[0]}.json"
    if side.is_file():
        return read_json(side)
    raise CheckpointError(f"{weights}: no config beside it: {missing_what} are not stored in the weights. Copy "
                          f"{source} next to the file as {side} (or load the snapshot folder with its loader).")
