"""SDXS (AiArtLab/sdxs) UNet: a config-driven UNet2DConditionModel in pure torch.

Provenance: written from the architecture of diffusers' ``UNet2DConditionModel`` and its blocks
(diffusers/models/unets/unet_2d_condition.py, unet_2d_blocks.py, resnet.py, transformers/transformer_2d.py,
attention.py; read in 0.42.1). Module names follow the diffusers state dict, so ``unet/`` weights load
without renaming. Everything comes from ``unet/config.json``; options this port does not implement are
refused with a ValueError naming them (never silently ignored).

SDXS conditions on one token: the MEXMA-SigLIP pooled + projected text vector as ``context`` [B, 1, 1152].
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import TorchOps
from ..registry import fetch_hint


@dataclass
class SDXSUNetParams:
    in_channels: int = 16
    out_channels: int = 16
    block_out_channels: list = field(default_factory=lambda: [384, 576, 768, 960])
    down_block_types: list = field(default_factory=lambda: ["CrossAttnDownBlock2D"] * 4)
    up_block_types: list = field(default_factory=lambda: ["CrossAttnUpBlock2D"] * 4)
    mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn"
    layers_per_block: list = field(default_factory=lambda: [2] * 4)
    # per down block, per resnet layer (diffusers allows an int, a per-block list or per-layer lists)
    transformer_layers_per_block: list = field(default_factory=lambda: [[4] * 2, [6] * 2, [8] * 2, [10] * 2])
    # per up block, per resnet layer; None = the down lists reversed (diffusers' default)
    reverse_transformer_layers_per_block: Optional[list] = None
    num_heads: list = field(default_factory=lambda: [8] * 4)  # per down block (diffusers' attention_head_dim quirk)
    cross_attention_dim: int = 1152
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    time_embedding_dim: Optional[int] = None
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    resnet_out_scale_factor: float = 1.0
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    center_input_sample: bool = False
    sample_size: Optional[int] = None

    DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
    UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
    MID_TYPES = ("UNetMidBlock2DCrossAttn", None)

    def __post_init__(self):
        n = len(self.block_out_channels)
        if n < 1 or any(int(c) <= 0 for c in self.block_out_channels):
            raise ValueError(f"block_out_channels must be positive, got {self.block_out_channels}")
        for name in ("down_block_types", "up_block_types", "layers_per_block", "transformer_layers_per_block",
                     "num_heads"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries; block_out_channels has {n}")
        bad = [t for t in self.down_block_types if t not in self.DOWN_TYPES]
        bad += [t for t in self.up_block_types if t not in self.UP_TYPES]
        if self.mid_block_type not in self.MID_TYPES:
            bad.append(self.mid_block_type)
        if bad:
            raise ValueError(f"unsupported block types {bad} (supported: {self.DOWN_TYPES + self.UP_TYPES} and "
                             "UNetMidBlock2DCrossAttn)")
        if self.in_channels <= 0 or self.out_channels <= 0 or self.cross_attention_dim <= 0:
            raise ValueError("in_channels, out_channels and cross_attention_dim must be positive")
        for i, (c, h) in enumerate(zip(self.block_out_channels, self.num_heads)):
            if h <= 0 or c % h:
                raise ValueError(f"block {i}: {c} channels are not divisible into {h} attention heads")
            if c % self.norm_num_groups:
                raise ValueError(f"block {i}: {c} channels are not divisible by norm_num_groups {self.norm_num_groups}")
        if self.time_embed_dim % 2:
            raise ValueError(f"time embedding dim must be even, got {self.time_embed_dim}")
        if self.conv_in_kernel % 2 == 0 or self.conv_out_kernel % 2 == 0:
            raise ValueError("conv_in_kernel / conv_out_kernel must be odd")
        if self.reverse_transformer_layers_per_block is None:
            # diffusers: the down depths reversed, each repeated over the up block's layers (uniform only).
            rev = []
            for i in range(n):
                depths = self.transformer_layers_per_block[n - 1 - i]
                if len(set(depths)) > 1:
                    raise ValueError("per-layer transformer depths need reverse_transformer_layers_per_block")
                rev.append([depths[0]] * (self.layers_per_block[n - 1 - i] + 1))
            self.reverse_transformer_layers_per_block = rev
        if len(self.reverse_transformer_layers_per_block) != n:
            raise ValueError("reverse_transformer_layers_per_block needs one entry per up block")

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4

    # Keys of UNet2DConditionModel's config that switch on features this port does not implement, with the
    # value that means "off".
    _OFF = {
        "class_embed_type": None, "addition_embed_type": None, "num_class_embeds": None,
        "encoder_hid_dim": None, "encoder_hid_dim_type": None, "time_cond_proj_dim": None,
        "timestep_post_act": None, "time_embedding_act_fn": None, "projection_class_embeddings_input_dim": None,
        "addition_time_embed_dim": None, "dual_cross_attention": False, "only_cross_attention": False,
        "cross_attention_norm": None, "class_embeddings_concat": False, "resnet_skip_time_act": False,
        "num_attention_heads": None, "mid_block_only_cross_attention": None,
    }
    _MUST = {"act_fn": "silu", "resnet_time_scale_shift": "default", "time_embedding_type": "positional",
             "attention_type": "default"}

    @classmethod
    def from_diffusers_config(cls, cfg: dict) -> "SDXSUNetParams":
        """From a diffusers ``unet/config.json`` (UNet2DConditionModel)."""
        name = cfg.get("_class_name", "UNet2DConditionModel")
        if name != "UNet2DConditionModel":
            raise ValueError(f"config names {name!r}; the SDXS UNet is a UNet2DConditionModel")
        on = [f"{k}={cfg[k]!r}" for k, off in cls._OFF.items() if cfg.get(k, off) not in (off, None, False)]
        on += [f"{k}={cfg[k]!r}" for k, want in cls._MUST.items() if cfg.get(k, want) != want]
        if cfg.get("norm_num_groups", 32) is None:
            on.append("norm_num_groups=None")
        if on:
            raise ValueError(f"unsupported UNet2DConditionModel options: {', '.join(on)}")
        d = cls()
        down = list(cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
        n = len(down)
        lpb = cfg.get("layers_per_block", 2)
        lpb = [int(lpb)] * n if isinstance(lpb, int) else [int(x) for x in lpb]
        tl = cfg.get("transformer_layers_per_block", 1)
        tl = [tl] * n if isinstance(tl, int) else list(tl)
        if len(tl) != n or len(lpb) != n:
            raise ValueError("transformer_layers_per_block / layers_per_block need one entry per down block")
        tl = [_per_layer(x, lpb[i], f"down block {i}") for i, x in enumerate(tl)]
        rev = cfg.get("reverse_transformer_layers_per_block")
        if rev is not None:
            rev = [_per_layer(x, lpb[n - 1 - i] + 1, f"up block {i}") for i, x in enumerate(rev)]
        # diffusers quirk: `attention_head_dim` is the number of heads (num_attention_heads is refused above).
        heads = cfg.get("attention_head_dim", 8)
        heads = [int(heads)] * n if isinstance(heads, int) else [int(h) for h in heads]
        cad = cfg.get("cross_attention_dim", 1280)
        if not isinstance(cad, int):
            if len(set(cad)) != 1:
                raise ValueError(f"per-block cross_attention_dim {cad} is not supported")
            cad = cad[0]
        return cls(
            in_channels=int(cfg.get("in_channels", 4)),
            out_channels=int(cfg.get("out_channels", 4)),
            block_out_channels=[int(c) for c in cfg.get("block_out_channels", [320, 640, 1280, 1280])],
            down_block_types=down,
            up_block_types=list(cfg.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)),
            mid_block_type=cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn"),
            layers_per_block=lpb,
            transformer_layers_per_block=tl,
            reverse_transformer_layers_per_block=rev,
            num_heads=heads,
            cross_attention_dim=int(cad),
            use_linear_projection=bool(cfg.get("use_linear_projection", False)),
            upcast_attention=bool(cfg.get("upcast_attention", False)),
            norm_num_groups=int(cfg.get("norm_num_groups", 32)),
            norm_eps=float(cfg.get("norm_eps", 1e-5)),
            flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
            freq_shift=float(cfg.get("freq_shift", 0)),
            time_embedding_dim=cfg.get("time_embedding_dim"),
            downsample_padding=int(cfg.get("downsample_padding", 1)),
            mid_block_scale_factor=float(cfg.get("mid_block_scale_factor", 1.0)),
            resnet_out_scale_factor=float(cfg.get("resnet_out_scale_factor", 1.0)),
            conv_in_kernel=int(cfg.get("conv_in_kernel", 3)),
            conv_out_kernel=int(cfg.get("conv_out_kernel", 3)),
            center_input_sample=bool(cfg.get("center_input_sample", False)),
            sample_size=cfg.get("sample_size", d.sample_size),
        )


def _per_layer(x, layers: int, where: str) -> list:
    if isinstance(x, int):
        return [int(x)] * layers
    x = [int(v) for v in x]
    if len(x) != layers:
        raise ValueError(f"{where}: {len(x)} transformer depths for {layers} resnet layers")
    return x


# ----------------------------------------------------------------------------- state-dict layout

def _describe(sd: dict) -> Optional[str]:
    keys = list(sd)
    has = lambda s: any(s in k for k in keys)  # noqa: E731
    if has("attn.qkv") or has("mlp.inverted_conv") or has("ff.conv_inverted") or has("caption_projection"):
        return "a Sana/Waifu Linear DiT (load it with LinearDiTLoader or the Waifu snapshot loader)"
    if has("double_blocks") or has("single_blocks"):
        return "a Flux model"
    if has("joint_blocks"):
        return "an SD3 model"
    if has("input_blocks.") or has("model.diffusion_model."):
        return "a UNet in the original LDM/ComfyUI layout (use the diffusers unet/ folder of the snapshot)"
    if (has("decoder.up_blocks") or has("decoder.up.")) and not has("time_embedding"):
        return "a VAE"
    if has("encoder.layer.") or has("embeddings.word_embeddings"):
        return "an XLM-R/BERT text encoder"
    if has("vision_model.") or has("text_projector"):
        return "a MEXMA-SigLIP model"
    return None


def to_native_layout(sd: dict) -> dict:
    """diffusers UNet2DConditionModel keys (optionally under ``unet.``) -> this module's (the same) keys.
    ValueError naming what the dict looks like when it is not such a UNet."""
    marker = "time_embedding.linear_1.weight"
    for key in sd:
        if key.endswith(marker) and (key == marker or key[: -len(marker)].endswith(".")):
            prefix = key[: -len(marker)]
            out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            if "conv_in.weight" in out and any(k.startswith("down_blocks.") for k in out):
                return out
    what = _describe(sd)
    sample = ", ".join(list(sd)[:3])
    raise ValueError("not a diffusers UNet2DConditionModel (SDXS UNet) state dict"
                     + (f": it looks like {what}" if what else "")
                     + f" (expected conv_in.*, time_embedding.*, down_blocks.N.* keys; first keys: {sample})")


# ----------------------------------------------------------------------------- modules


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, shift: float,
                       max_period: float = 10000.0) -> torch.Tensor:
    """diffusers' get_timestep_embedding (scale 1): [sin, cos] (or [cos, sin] when flipped), fp32."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / (half - shift)
    emb = t[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class _TimestepEmbedding(nn.Module):
    def __init__(self, cin, dim, dtype, device, ops):
        super().__init__()
        self.linear_1 = ops.Linear(cin, dim, dtype=dtype, device=device)
        self.linear_2 = ops.Linear(dim, dim, dtype=dtype, device=device)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    def __init__(self, cin, cout, temb, groups, eps, scale, dtype, device, ops):
        super().__init__()
        self.output_scale_factor = scale
        self.norm1 = ops.GroupNorm(groups, cin, eps=eps, affine=True, dtype=dtype, device=device)
        self.conv1 = ops.Conv2d(cin, cout, 3, padding=1, dtype=dtype, device=device)
        self.time_emb_proj = ops.Linear(temb, cout, dtype=dtype, device=device)
        self.norm2 = ops.GroupNorm(groups, cout, eps=eps, affine=True, dtype=dtype, device=device)
        self.conv2 = ops.Conv2d(cout, cout, 3, padding=1, dtype=dtype, device=device)
        self.conv_shortcut = ops.Conv2d(cin, cout, 1, dtype=dtype, device=device) if cin != cout else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = skip + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Attention(nn.Module):
    """Multi-head attention, q/k/v without bias, out with bias (diffusers ``Attention`` defaults)."""

    def __init__(self, dim, heads, context_dim, upcast, dtype, device, ops):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        self.to_q = ops.Linear(dim, dim, bias=False, dtype=dtype, device=device)
        self.to_k = ops.Linear(context_dim, dim, bias=False, dtype=dtype, device=device)
        self.to_v = ops.Linear(context_dim, dim, bias=False, dtype=dtype, device=device)
        self.to_out = nn.ModuleList([ops.Linear(dim, dim, bias=True, dtype=dtype, device=device)])

    def forward(self, x, context=None):
        if context is not None and context.shape[1] == 1:
            # One key (SDXS attends to the pooled text vector): softmax over a single score is exactly 1, so every
            # query receives v and the query projection cannot matter. Same result without the per-token q
            # projection, attention and output projection.
            return self.to_out[0](self.to_v(context)).expand(-1, x.shape[1], -1)
        context = x if context is None else context
        b = x.shape[0]
        q, k, v = (t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        if self.upcast and q.dtype != torch.float32:  # upcast_attention: softmax(QK^T) in fp32
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1]))


class _GEGLU(nn.Module):
    def __init__(self, dim, inner, dtype, device, ops):
        super().__init__()
        self.proj = ops.Linear(dim, inner * 2, dtype=dtype, device=device)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)  # exact erf GELU


class _FeedForward(nn.Module):
    def __init__(self, dim, dtype, device, ops):
        super().__init__()
        # net.0 = GEGLU, net.1 = dropout (no weights), net.2 = Linear: diffusers' indices, kept for the keys.
        self.net = nn.ModuleList([_GEGLU(dim, dim * 4, dtype, device, ops), nn.Identity(),
                                  ops.Linear(dim * 4, dim, dtype=dtype, device=device)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, heads, context_dim, upcast, dtype, device, ops):
        super().__init__()
        self.norm1 = ops.LayerNorm(dim, eps=1e-5, dtype=dtype, device=device)
        self.attn1 = Attention(dim, heads, dim, upcast, dtype, device, ops)
        self.norm2 = ops.LayerNorm(dim, eps=1e-5, dtype=dtype, device=device)
        self.attn2 = Attention(dim, heads, context_dim, upcast, dtype, device, ops)
        self.norm3 = ops.LayerNorm(dim, eps=1e-5, dtype=dtype, device=device)
        self.ff = _FeedForward(dim, dtype, device, ops)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    def __init__(self, channels, heads, depth, p: SDXSUNetParams, dtype, device, ops):
        super().__init__()
        self.linear = p.use_linear_projection
        self.norm = ops.GroupNorm(p.norm_num_groups, channels, eps=1e-6, affine=True, dtype=dtype, device=device)
        if self.linear:
            self.proj_in = ops.Linear(channels, channels, dtype=dtype, device=device)
            self.proj_out = ops.Linear(channels, channels, dtype=dtype, device=device)
        else:
            self.proj_in = ops.Conv2d(channels, channels, 1, dtype=dtype, device=device)
            self.proj_out = ops.Conv2d(channels, channels, 1, dtype=dtype, device=device)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(channels, heads, p.cross_attention_dim, p.upcast_attention, dtype, device, ops)
            for _ in range(depth)])

    def forward(self, x, context):
        b, c, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.linear:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        if self.linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.linear:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()
        if not self.linear:
            x = self.proj_out(x)
        return x + residual


class _Downsample(nn.Module):
    def __init__(self, channels, padding, dtype, device, ops):
        super().__init__()
        self.padding = padding
        self.conv = ops.Conv2d(channels, channels, 3, stride=2, padding=padding, dtype=dtype, device=device)

    def forward(self, x):
        if self.padding == 0:  # diffusers pads right/bottom by one instead
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class _Upsample(nn.Module):
    def __init__(self, channels, dtype, device, ops):
        super().__init__()
        self.conv = ops.Conv2d(channels, channels, 3, padding=1, dtype=dtype, device=device)

    def forward(self, x, size=None):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest") if size is None else \
            F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D (with attentions) or DownBlock2D."""

    def __init__(self, cin, cout, layers, depths, heads, cross, add_down, temb, p, dtype, device, ops):
        super().__init__()
        g, e, s = p.norm_num_groups, p.norm_eps, p.resnet_out_scale_factor
        self.resnets = nn.ModuleList([ResnetBlock2D(cin if i == 0 else cout, cout, temb, g, e, s, dtype, device, ops)
                                      for i in range(layers)])
        self.attentions = nn.ModuleList([Transformer2DModel(cout, heads, depths[i], p, dtype, device, ops)
                                         for i in range(layers)]) if cross else None
        self.downsamplers = nn.ModuleList([_Downsample(cout, p.downsample_padding, dtype, device, ops)]) \
            if add_down else None

    def forward(self, x, temb, context):
        states = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            states.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            states.append(x)
        return x, states


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D (with attentions) or UpBlock2D."""

    def __init__(self, cin, cout, prev, layers, depths, heads, cross, add_up, temb, p, dtype, device, ops):
        super().__init__()
        g, e, s = p.norm_num_groups, p.norm_eps, p.resnet_out_scale_factor
        self.resnets = nn.ModuleList()
        for i in range(layers):
            skip = cin if i == layers - 1 else cout
            rin = prev if i == 0 else cout
            self.resnets.append(ResnetBlock2D(rin + skip, cout, temb, g, e, s, dtype, device, ops))
        self.attentions = nn.ModuleList([Transformer2DModel(cout, heads, depths[i], p, dtype, device, ops)
                                         for i in range(layers)]) if cross else None
        self.upsamplers = nn.ModuleList([_Upsample(cout, dtype, device, ops)]) if add_up else None

    def forward(self, x, skips, temb, context, size=None):
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn with one attention: resnet, attention, resnet."""

    def __init__(self, c, heads, depth, temb, p, dtype, device, ops):
        super().__init__()
        g, e, s = p.norm_num_groups, p.norm_eps, p.mid_block_scale_factor
        self.resnets = nn.ModuleList([ResnetBlock2D(c, c, temb, g, e, s, dtype, device, ops) for _ in range(2)])
        self.attentions = nn.ModuleList([Transformer2DModel(c, heads, depth, p, dtype, device, ops)])

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


class SDXSUNet(nn.Module):
    """``forward(x [B,C,H,W], timesteps [B] (float ok), context [B,L,cross_dim]) -> [B,C_out,H,W]``;
    ComfyUI's BaseModel calls it as ``(x, t, context=..., control=..., transformer_options=...)``."""

    def __init__(self, params: SDXSUNetParams = None, dtype=None, device=None, operations=None):
        super().__init__()
        self.params = p = params or SDXSUNetParams()
        ops = operations or TorchOps
        ch, n = p.block_out_channels, len(p.block_out_channels)
        temb = p.time_embed_dim
        self.conv_in = ops.Conv2d(p.in_channels, ch[0], p.conv_in_kernel, padding=p.conv_in_kernel // 2,
                                  dtype=dtype, device=device)
        self.time_embedding = _TimestepEmbedding(ch[0], temb, dtype, device, ops)
        self.down_blocks = nn.ModuleList()
        out = ch[0]
        for i, kind in enumerate(p.down_block_types):
            cin, out = out, ch[i]
            self.down_blocks.append(DownBlock(cin, out, p.layers_per_block[i], p.transformer_layers_per_block[i],
                                              p.num_heads[i], kind == "CrossAttnDownBlock2D", i < n - 1, temb, p,
                                              dtype, device, ops))
        self.mid_block = None
        if p.mid_block_type is not None:
            self.mid_block = MidBlock(ch[-1], p.num_heads[-1], p.transformer_layers_per_block[-1][0], temb, p,
                                      dtype, device, ops)
        rch, rheads, rlayers = ch[::-1], p.num_heads[::-1], p.layers_per_block[::-1]
        self.up_blocks = nn.ModuleList()
        out = rch[0]
        for i, kind in enumerate(p.up_block_types):
            prev, out = out, rch[i]
            cin = rch[min(i + 1, n - 1)]
            self.up_blocks.append(UpBlock(cin, out, prev, rlayers[i] + 1, p.reverse_transformer_layers_per_block[i],
                                          rheads[i], kind == "CrossAttnUpBlock2D", i < n - 1, temb, p,
                                          dtype, device, ops))
        self.conv_norm_out = ops.GroupNorm(p.norm_num_groups, ch[0], eps=p.norm_eps, affine=True, dtype=dtype,
                                           device=device)
        self.conv_out = ops.Conv2d(ch[0], p.out_channels, p.conv_out_kernel, padding=p.conv_out_kernel // 2,
                                   dtype=dtype, device=device)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor = None, **kwargs):
        p = self.params
        if context is None:
            raise ValueError("the SDXS UNet needs a context [B, L, cross_attention_dim]")
        if context.ndim == 2:  # a pooled vector: one token
            context = context[:, None, :]
        if context.shape[-1] != p.cross_attention_dim:
            raise ValueError(f"context has width {context.shape[-1]}; this UNet cross-attends to "
                             f"{p.cross_attention_dim}-dim states (the MEXMA-SigLIP pooled text embedding)")
        if x.shape[1] != p.in_channels:
            raise ValueError(f"input has {x.shape[1]} channels; this UNet takes {p.in_channels}")
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], device=x.device)
        timesteps = timesteps.to(x.device).reshape(-1).expand(x.shape[0])
        if context.shape[0] != x.shape[0]:
            context = context.expand(x.shape[0], -1, -1) if context.shape[0] == 1 else context
        context = context.to(x.dtype)
        if p.center_input_sample:
            x = 2 * x - 1.0
        temb = self.time_embedding(timestep_embedding(timesteps, p.block_out_channels[0], p.flip_sin_to_cos,
                                                      p.freq_shift).to(x.dtype))
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, states = block(h, temb, context)
            skips += states
        if self.mid_block is not None:
            h = self.mid_block(h, temb, context)
        # diffusers forwards the skip's size to the upsamplers only when H or W is not a multiple of 2^ups.
        factor = 2 ** sum(1 for b in self.up_blocks if b.upsamplers is not None)
        odd = any(s % factor for s in x.shape[-2:])
        for block in self.up_blocks:
            take = len(block.resnets)
            mine, skips = skips[-take:], skips[:-take]
            size = skips[-1].shape[2:] if (odd and block.upsamplers is not None) else None
            h = block(h, mine, temb, context, size)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


# ----------------------------------------------------------------------------- resolving files


def _sidecar(weights, names) -> "Optional[object]":
    for name in names:
        p = weights.parent / name
        if p.is_file():
            return p
    return None


def resolve_unet(path):
    """(SDXSUNetParams, state dict, DDPMParams, weights path) for the ``unet/`` folder of a snapshot (or its
    root), or a single file with its ``config.json`` beside it (a ``unet/`` folder, or ``<stem>.json``) and
    the scheduler config from the snapshot's ``scheduler/`` or ``<stem>.scheduler.json``.

    The family is checked before the configs, so a wrong file is named as what it is."""
    from pathlib import Path

    from .. import loading
    from ..ddpm import DDPMParams
    path = Path(path)
    sd, cfg, weights = loading.load_component(path, "unet", fetch_hint("sdxs"))
    sd = loading.convert_layout(to_native_layout, sd, weights, "SDXS UNet (diffusers UNet2DConditionModel)")
    stem = weights.name.split(".")[0]
    if cfg is None and (side := _sidecar(weights, (f"{stem}.json", f"{stem}.config.json"))) is not None:
        cfg = loading.read_json(side)
    if cfg is None:
        raise loading.CheckpointError(
            f"{weights}: no UNet config: the head count and block layout are not recoverable from the weights. "
            f"Put the snapshot's unet/config.json beside the file as {stem}.json (or load the snapshot folder "
            "with SDXSSnapshotLoader)")
    try:
        params = SDXSUNetParams.from_diffusers_config(cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise loading.CheckpointError(f"{weights}: unsupported UNet config: {e}") from None
    snapshot = weights.parent.parent if weights.parent.name == "unet" else None
    sched = None
    if snapshot is not None and (snapshot / "scheduler" / "scheduler_config.json").is_file():
        sched = snapshot / "scheduler" / "scheduler_config.json"
    sched = sched or _sidecar(weights, (f"{stem}.scheduler.json", "scheduler_config.json"))
    if sched is None:
        raise loading.CheckpointError(
            f"{weights}: no scheduler config (the noise schedule and prediction type of the model). Put the "
            f"snapshot's scheduler/scheduler_config.json beside the file as {stem}.scheduler.json")
    sched_cfg = loading.read_json(sched)  # its own errors name the file already
    try:
        sched_params = DDPMParams.from_scheduler_config(sched_cfg)
    except ValueError as e:
        raise loading.CheckpointError(f"{sched}: {e}") from None
    return params, sd, sched_params, weights


def is_sdxs_snapshot(folder) -> bool:
    return all((folder / sub).is_dir() for sub in ("unet", "text_encoder", "vae"))
