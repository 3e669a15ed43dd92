"""AutoencoderKL (the 16-channel AuraDiffusion VAE used by Waifu), pure torch.

Follows diffusers ``AutoencoderKL`` (models/autoencoders/autoencoder_kl.py, vae.py, unet_2d_blocks.py,
resnet.py), itself a port of the LDM ``Encoder``/``Decoder`` (ldm/modules/diffusionmodules/model.py).
Parameter names are diffusers' ("native layout"); :func:`to_native_layout` also reads the LDM/ComfyUI
layout and old diffusers attention names.

``encode`` / ``decode`` work on *raw* latents: the scaling/shift factors are carried in the params for the
caller (latent format) and never applied here.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import TorchOps

# Every GroupNorm of this VAE (resnets, mid attention, conv_norm_out) uses this eps (diffusers passes
# resnet_eps=1e-6 everywhere; LDM's Normalize is eps=1e-6 too).
_NORM_EPS = 1e-6


@dataclass
class AutoencoderKLParams:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = False
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    # Kept only so a config round-trips; this module never uses them (per-channel latent normalisation, if
    # a checkpoint defines it, is the caller's latent-format business like scaling_factor).
    latents_mean: Optional[Sequence[float]] = None
    latents_std: Optional[Sequence[float]] = None

    # diffusers blocks this port implements (the only ones AutoencoderKL checkpoints use in practice).
    _DOWN = "DownEncoderBlock2D"
    _UP = "UpDecoderBlock2D"

    def __post_init__(self):
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if self.latents_mean is not None:
            self.latents_mean = tuple(float(v) for v in self.latents_mean)
        if self.latents_std is not None:
            self.latents_std = tuple(float(v) for v in self.latents_std)
        if self.shift_factor is None:
            self.shift_factor = 0.0
        if not self.block_out_channels or any(c < 1 for c in self.block_out_channels):
            raise ValueError(f"block_out_channels must be a non-empty list of positive ints, got {self.block_out_channels}")
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {self.block_out_channels} are not all divisible by "
                             f"norm_num_groups={self.norm_num_groups} (GroupNorm needs that)")
        for name, v in (("latents_mean", self.latents_mean), ("latents_std", self.latents_std)):
            if v is not None and len(v) != self.latent_channels:
                raise ValueError(f"{name} has {len(v)} entries for {self.latent_channels} latent channels")

    @property
    def downscale(self) -> int:
        """Spatial factor between image and latent (one stride-2 conv per level but the last)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers_config(cls, cfg: dict) -> "AutoencoderKLParams":
        """From a diffusers ``vae/config.json`` dict.

        A key the config leaves out takes *diffusers'* default (as diffusers would build the model), not this
        dataclass's Waifu default -- notably ``mid_block_add_attention`` defaults to True in diffusers.
        """
        name = cfg.get("_class_name", "AutoencoderKL")
        if name != "AutoencoderKL":
            raise ValueError(f"VAE config names {name!r}; only diffusers AutoencoderKL is supported")
        channels = tuple(cfg.get("block_out_channels", (64,)))
        n = len(channels)
        down = tuple(cfg.get("down_block_types", (cls._DOWN,)))
        up = tuple(cfg.get("up_block_types", (cls._UP,)))
        if any(t != cls._DOWN for t in down) or any(t != cls._UP for t in up):
            raise ValueError(f"unsupported VAE block types down={down} up={up}: only {cls._DOWN}/{cls._UP}")
        if len(down) != n or len(up) != n:
            raise ValueError(f"VAE config has {len(down)} down / {len(up)} up blocks for {n} block_out_channels")
        act = cfg.get("act_fn", "silu")
        if act not in ("silu", "swish"):  # diffusers' get_activation treats both names as SiLU
            raise ValueError(f"unsupported VAE act_fn {act!r}: only silu")
        shift = cfg.get("shift_factor")
        return cls(
            in_channels=int(cfg.get("in_channels", 3)),
            out_channels=int(cfg.get("out_channels", 3)),
            latent_channels=int(cfg.get("latent_channels", 4)),
            block_out_channels=channels,
            layers_per_block=int(cfg.get("layers_per_block", 1)),
            norm_num_groups=int(cfg.get("norm_num_groups", 32)),
            mid_block_add_attention=bool(cfg.get("mid_block_add_attention", True)),
            use_quant_conv=bool(cfg.get("use_quant_conv", True)),
            use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
            scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
            shift_factor=0.0 if shift is None else float(shift),
            latents_mean=cfg.get("latents_mean"),
            latents_std=cfg.get("latents_std"),
        )

    @classmethod
    def infer(cls, sd: dict, norm_num_groups: Optional[int] = None) -> "AutoencoderKLParams":
        """Architecture from a native-layout state dict (see :func:`to_native_layout`).

        What the weights cannot tell is left at the Waifu defaults: scaling_factor/shift_factor, and the GroupNorm
        group count. ``norm_num_groups`` may be passed explicitly; otherwise it is 32 (every SD-family VAE) when it
        divides all block channels, else -- a guess, with a warning -- the largest count <= 32 that divides them.
        """
        def shape(key):
            if key not in sd:
                raise ValueError(f"not an AutoencoderKL state dict in native layout: missing {key!r}")
            return tuple(sd[key].shape)

        levels = sorted({int(m.group(1)) for k in sd for m in [re.match(r"encoder\.down_blocks\.(\d+)\.", k)] if m})
        if not levels or levels != list(range(len(levels))):
            raise ValueError(f"not an AutoencoderKL state dict: encoder.down_blocks indices {levels}")
        channels = tuple(shape(f"encoder.down_blocks.{i}.resnets.0.conv2.weight")[0] for i in levels)
        layers = len({m.group(1) for k in sd for m in [re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k)] if m})
        attn = {side: f"{side}.mid_block.attentions.0.to_q.weight" in sd for side in ("encoder", "decoder")}
        if attn["encoder"] != attn["decoder"]:
            raise ValueError(f"mid-block attention present in only one of encoder/decoder ({attn}); "
                             "diffusers AutoencoderKL has one switch for both")
        if norm_num_groups is None:
            norm_num_groups = 32
            if any(c % 32 for c in channels):
                g = math.gcd(*channels)
                norm_num_groups = max(d for d in range(1, 33) if g % d == 0)
                warnings.warn(f"VAE block channels {channels} are not multiples of 32; guessing "
                              f"norm_num_groups={norm_num_groups} (the weights do not record it)")
        return cls(
            in_channels=shape("encoder.conv_in.weight")[1],
            out_channels=shape("decoder.conv_out.weight")[0],
            latent_channels=shape("decoder.conv_in.weight")[1],
            block_out_channels=channels,
            layers_per_block=layers,
            norm_num_groups=norm_num_groups,
            mid_block_add_attention=attn["encoder"],
            use_quant_conv="quant_conv.weight" in sd,
            use_post_quant_conv="post_quant_conv.weight" in sd,
        )


def check_latent_channels(params: AutoencoderKLParams, expected: int = 16, source: str = "the VAE") -> None:
    """Refuse a VAE whose latent width is not what the diffusion model works in (SD/SDXL VAEs are 4-channel)."""
    if params.latent_channels != expected:
        hint = " (that is an SD 1.x/SDXL-style VAE)" if params.latent_channels == 4 else ""
        raise ValueError(f"{source} has {params.latent_channels} latent channels{hint}; the Waifu pack expects a "
                         f"{expected}-channel VAE (the AuraDiffusion 16-channel AutoencoderKL)")


# ----------------------------------------------------------------------------------------------------------------
# State-dict layouts


# Old diffusers (pre-0.14 "AttentionBlock") and LDM attention names -> current diffusers names.
_OLD_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LDM_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _looks_like(keys) -> Optional[str]:
    if any(re.match(r"(.*\.)?blocks\.\d+\.attn\.qkv\.", k) or "transformer_blocks." in k for k in keys):
        return "a Sana/Waifu diffusion transformer"
    if any(k.startswith("encoder.layer.") or ".encoder.layer." in k for k in keys):
        return "an XLM-R/BERT text encoder"
    if any("down_blocks." in k for k in keys) and any("time_embedding" in k for k in keys):
        return "a UNet"
    return None


def _ldm_key(key: str, n_up: int) -> str:
    """One LDM/ComfyUI VAE key -> diffusers name (n_up: number of decoder levels, LDM numbers them reversed)."""
    m = re.match(r"(encoder|decoder)\.(down|up)\.(\d+)\.(block|downsample|upsample)\.(.*)", key)
    if m:
        side, kind, i, sub, rest = m.groups()
        i = int(i)
        if kind == "up":
            i = n_up - 1 - i  # LDM builds decoder.up from the lowest resolution index upward
        blocks = "down_blocks" if kind == "down" else "up_blocks"
        if sub == "block":
            j, rest = rest.split(".", 1)
            rest = rest.replace("nin_shortcut", "conv_shortcut")
            return f"{side}.{blocks}.{i}.resnets.{j}.{rest}"
        return f"{side}.{blocks}.{i}.{sub}rs.0.{rest}"  # downsample.conv -> downsamplers.0.conv
    m = re.match(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(\w+)\.(.*)", key)
    if m:
        side, sub, layer, rest = m.groups()
        if sub == "attn_1":
            return f"{side}.mid_block.attentions.0.{_LDM_ATTN.get(layer, layer)}.{rest}"
        layer = layer.replace("nin_shortcut", "conv_shortcut")
        return f"{side}.mid_block.resnets.{0 if sub == 'block_1' else 1}.{layer}.{rest}"
    return re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)


def to_native_layout(sd: dict) -> dict:
    """Any supported AutoencoderKL state dict -> diffusers key names (a new dict; tensors shared or reshaped).

    Accepts diffusers (current or old ``query/key/value/proj_attn`` attention names) and the original
    LDM/ComfyUI layout, bare or under ``first_stage_model.`` / ``vae.`` (only the keys under that prefix are
    kept, so a whole checkpoint works). Mid-attention 1x1-conv weights [C, C, 1, 1] become linear [C, C].
    Keys it does not recognise are passed through (a strict ``load_state_dict`` then names them).
    Raises ValueError when the dict is not an AutoencoderKL.
    """
    for prefix in ("first_stage_model.", "vae."):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    keys = list(sd)
    ldm = any(re.match(r"(encoder|decoder)\.(down|up|mid)\.", k) for k in keys)
    native = any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in keys)
    what = _looks_like(keys)
    if what is not None or not (ldm or native) or "decoder.conv_in.weight" not in sd:
        raise ValueError(f"not an AutoencoderKL VAE state dict: it looks like {what or 'something else'} "
                         f"(first keys: {keys[:4]})")
    n_up = len({m.group(1) for k in keys for m in [re.match(r"decoder\.up\.(\d+)\.", k)] if m})
    out = {}
    for k, v in sd.items():
        if ldm:
            k = _ldm_key(k, n_up)
        m = re.match(r"((?:en|de)coder\.mid_block\.attentions\.0)\.(\w+(?:\.0)?)\.(weight|bias)$", k)
        if m:
            k = f"{m.group(1)}.{_OLD_ATTN.get(m.group(2), m.group(2))}.{m.group(3)}"
            if m.group(2) != "group_norm" and v.ndim == 4:
                v = v.reshape(v.shape[0], v.shape[1])  # 1x1 conv == linear
        out[k] = v
    return out


# ----------------------------------------------------------------------------------------------------------------
# Modules (diffusers names so a native-layout state dict loads as is)


class ResnetBlock(nn.Module):
    """GN-SiLU-conv3x3 twice, with a 1x1 shortcut when the width changes (no time embedding in a VAE)."""

    def __init__(self, cin, cout, groups, dtype=None, device=None, operations=TorchOps):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.norm1 = operations.GroupNorm(groups, cin, eps=_NORM_EPS, affine=True, **kw)
        self.conv1 = operations.Conv2d(cin, cout, 3, padding=1, **kw)
        self.norm2 = operations.GroupNorm(groups, cout, eps=_NORM_EPS, affine=True, **kw)
        self.conv2 = operations.Conv2d(cout, cout, 3, padding=1, **kw)
        self.conv_shortcut = operations.Conv2d(cin, cout, 1, **kw) if cin != cout else None

    def forward(self, x):
        inplace = not torch.is_grad_enabled()   # the norms' outputs are fresh: no new multi-MB buffer for SiLU
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        h = self.conv2(F.silu(self.norm2(h), inplace=inplace))  # dropout is 0 at inference
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample(nn.Module):
    def __init__(self, channels, dtype=None, device=None, operations=TorchOps):
        super().__init__()
        self.conv = operations.Conv2d(channels, channels, 3, stride=2, padding=0, dtype=dtype, device=device)

    def forward(self, x):
        # LDM/diffusers pad only right and bottom (asymmetric), then a valid stride-2 conv.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels, dtype=None, device=None, operations=TorchOps):
        super().__init__()
        self.conv = operations.Conv2d(channels, channels, 3, padding=1, dtype=dtype, device=device)

    def forward(self, x):
        # Plain nearest-neighbour x2 (not bilinear), then a 3x3 conv.
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidAttention(nn.Module):
    """Single-head self-attention over all H*W positions, head_dim = C, residual; diffusers ``Attention`` with
    ``_from_deprecated_attn_block`` (LDM AttnBlock, whose q/k/v/proj are 1x1 convs == linears)."""

    def __init__(self, channels, groups, dtype=None, device=None, operations=TorchOps):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.group_norm = operations.GroupNorm(groups, channels, eps=_NORM_EPS, affine=True, **kw)
        self.to_q = operations.Linear(channels, channels, **kw)
        self.to_k = operations.Linear(channels, channels, **kw)
        self.to_v = operations.Linear(channels, channels, **kw)
        self.to_out = nn.ModuleList([operations.Linear(channels, channels, **kw)])

    def forward(self, x):
        b, c, h, w = x.shape
        t = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)  # [B, HW, C]
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # one head
        # SDPA's default scale 1/sqrt(C) is what diffusers uses (its upcast_softmax flag is ignored by SDPA).
        o = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        o = self.to_out[0](o).transpose(1, 2).reshape(b, c, h, w)
        return x + o


class MidBlock(nn.Module):
    """resnet, [attention], resnet."""

    def __init__(self, channels, groups, add_attention, dtype=None, device=None, operations=TorchOps):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups, **kw) for _ in range(2)])
        self.attentions = nn.ModuleList([MidAttention(channels, groups, **kw)] if add_attention else [])

    def forward(self, x):
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class DownBlock(nn.Module):
    def __init__(self, cin, cout, layers, groups, downsample, dtype=None, device=None, operations=TorchOps):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups, **kw) for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample(cout, **kw)] if downsample else [])

    def forward(self, x):
        for m in (*self.resnets, *self.downsamplers):
            x = m(x)
        return x


class UpBlock(nn.Module):
    def __init__(self, cin, cout, layers, groups, upsample, dtype=None, device=None, operations=TorchOps):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups, **kw) for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample(cout, **kw)] if upsample else [])

    def forward(self, x):
        for m in (*self.resnets, *self.upsamplers):
            x = m(x)
        return x


class Encoder(nn.Module):
    def __init__(self, p: AutoencoderKLParams, dtype=None, device=None, operations=TorchOps):
        super().__init__()
        ch, g = p.block_out_channels, p.norm_num_groups
        kw = dict(dtype=dtype, device=device)
        self.conv_in = operations.Conv2d(p.in_channels, ch[0], 3, padding=1, **kw)
        self.down_blocks = nn.ModuleList([
            DownBlock(ch[max(i - 1, 0)], ch[i], p.layers_per_block, g, i < len(ch) - 1, operations=operations, **kw)
            for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], g, p.mid_block_add_attention, operations=operations, **kw)
        self.conv_norm_out = operations.GroupNorm(g, ch[-1], eps=_NORM_EPS, affine=True, **kw)
        # mean and logvar of the diagonal Gaussian posterior ("double_z").
        self.conv_out = operations.Conv2d(ch[-1], 2 * p.latent_channels, 3, padding=1, **kw)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=not torch.is_grad_enabled()))


class Decoder(nn.Module):
    def __init__(self, p: AutoencoderKLParams, dtype=None, device=None, operations=TorchOps):
        super().__init__()
        ch, g = tuple(reversed(p.block_out_channels)), p.norm_num_groups
        kw = dict(dtype=dtype, device=device)
        self.conv_in = operations.Conv2d(p.latent_channels, ch[0], 3, padding=1, **kw)
        self.mid_block = MidBlock(ch[0], g, p.mid_block_add_attention, operations=operations, **kw)
        # The decoder has one resnet more per level than the encoder (LDM's num_res_blocks + 1).
        self.up_blocks = nn.ModuleList([
            UpBlock(ch[max(i - 1, 0)], ch[i], p.layers_per_block + 1, g, i < len(ch) - 1, operations=operations, **kw)
            for i in range(len(ch))])
        self.conv_norm_out = operations.GroupNorm(g, ch[-1], eps=_NORM_EPS, affine=True, **kw)
        self.conv_out = operations.Conv2d(ch[-1], p.out_channels, 3, padding=1, **kw)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=not torch.is_grad_enabled()))


class AutoencoderKL(nn.Module):
    """Image [-1, 1] <-> raw latent (unscaled). ``encode(pixels)`` / ``decode(samples)`` are what ComfyUI's VAE
    wrapper calls on ``first_stage_model``."""

    def __init__(self, params: AutoencoderKLParams, dtype=None, device=None, operations=None):
        super().__init__()
        operations = TorchOps if operations is None else operations
        self.params = params
        self.encoder = Encoder(params, dtype=dtype, device=device, operations=operations)
        self.decoder = Decoder(params, dtype=dtype, device=device, operations=operations)
        c = params.latent_channels
        kw = dict(dtype=dtype, device=device)
        self.quant_conv = operations.Conv2d(2 * c, 2 * c, 1, **kw) if params.use_quant_conv else None
        self.post_quant_conv = operations.Conv2d(c, c, 1, **kw) if params.use_post_quant_conv else None

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def encode(self, x: torch.Tensor, generator=None, sample: bool = False) -> torch.Tensor:
        """[B, C, H, W] in [-1, 1] -> posterior mean, or a sample of it when ``sample`` (noise drawn like
        diffusers' ``DiagonalGaussianDistribution.sample``: on the generator's device if it is CPU, in the
        moments' dtype; a list of generators seeds each batch item)."""
        f = self.params.downscale
        h, w = x.shape[-2:]
        if h % f or w % f:
            nh, nw = (max(f, round(s / f) * f) for s in (h, w))
            raise ValueError(f"VAE encode needs height and width that are multiples of {f}, got {h}x{w}; "
                             f"the nearest valid size is {nh}x{nw}")
        moments = self.encoder(_cpu_channels_last(x)).contiguous()
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        if not sample:
            return mean
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        return mean + std * _randn(mean.shape, generator, moments.device, moments.dtype)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent [B, latent_channels, h, w] -> image in about [-1, 1] (not clamped)."""
        z = _cpu_channels_last(z)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).contiguous()


def _cpu_channels_last(x: torch.Tensor) -> torch.Tensor:
    """On CPU, run the convs channels-last: oneDNN computes NHWC natively and skips a layout reorder around every
    conv, and GroupNorm/upsample keep the format (bench/workflow.py: decode ~15% faster at 256²). Other devices keep
    their default layout (not measured there)."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" and x.ndim == 4 else x


def _randn(shape, generator, device, dtype):
    """diffusers ``randn_tensor``: a CPU generator draws on the CPU (then moves), a list seeds per batch item."""
    gens = generator if isinstance(generator, (list, tuple)) else [generator]
    on = device
    if gens[0] is not None and gens[0].device.type == "cpu" and device.type != "cpu":
        on = torch.device("cpu")
    if len(gens) == 1:
        return torch.randn(shape, generator=gens[0], device=on, dtype=dtype).to(device)
    if len(gens) != shape[0]:
        raise ValueError(f"got {len(gens)} generators for a batch of {shape[0]}")
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=on, dtype=dtype) for g in gens]).to(device)
