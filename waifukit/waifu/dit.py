"""Native pure-torch Sana Linear DiT: the denoiser of the "Waifu" model (AiArtLab/waifu-2b).

Architecture follows NVlabs Sana (SanaMS, ``diffusion/model/nets/sana_multi_scale.py``) and diffusers'
``SanaTransformer2DModel``; this is an independent re-implementation. Parameters use the ORIGINAL Sana
key names, so original ``.pth``/``.safetensors`` checkpoints load directly and diffusers checkpoints go
through :func:`to_sana_layout`.

Waifu = SanaMS_1600M_P1_D20: hidden 2240, 20 blocks, patch 1, 16 latent channels, no positional
embedding, ReLU linear self-attention (70 x 32), softmax cross-attention (20 x 112), GLUMBConv FFN,
adaLN-single timestep conditioning. The output is a flow-matching velocity.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import TorchOps, cast_like


@dataclass
class LinearDiTParams:
    in_channels: int = 16
    out_channels: int = 16
    patch_size: int = 1
    hidden_size: int = 2240
    depth: int = 20
    linear_head_dim: int = 32
    cross_num_heads: int = 20
    mlp_ratio: float = 2.5
    caption_channels: int = 1024
    norm_eps: float = 1e-6
    caption_norm_eps: float = 1e-5
    # Original Sana blocks build LiteLA with eps=1e-8; diffusers hard-codes 1e-15.
    linear_eps: float = 1e-8

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "patch_size", "hidden_size", "depth",
                     "linear_head_dim", "cross_num_heads", "caption_channels"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"LinearDiTParams.{name} must be a positive int, got {v!r}")
        if self.hidden_size % self.linear_head_dim:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of linear_head_dim "
                             f"{self.linear_head_dim}")
        if self.hidden_size % self.cross_num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of cross_num_heads "
                             f"{self.cross_num_heads}")
        if not self.mlp_ratio > 0 or self.mlp_hidden <= 0:
            raise ValueError(f"mlp_ratio must give a positive FFN width, got {self.mlp_ratio!r}")
        for name in ("norm_eps", "caption_norm_eps", "linear_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LinearDiTParams.{name} must be > 0, got {getattr(self, name)!r}")

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.linear_head_dim

    @property
    def cross_head_dim(self) -> int:
        return self.hidden_size // self.cross_num_heads

    @property
    def mlp_hidden(self) -> int:
        # Same rounding as both reference implementations: int(expand_ratio * channels).
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def from_diffusers_config(cls, cfg: dict) -> "LinearDiTParams":
        """Params from a diffusers ``SanaTransformer2DModel`` config.json (dict or FrozenDict)."""
        cfg = dict(cfg)
        cls_name = cfg.get("_class_name")
        if cls_name is not None and cls_name != "SanaTransformer2DModel":
            raise ValueError(f"expected a SanaTransformer2DModel config, got _class_name={cls_name!r}")
        # diffusers builds a sincos pos embed exactly when interpolation_scale is not None
        # (PatchEmbed(pos_embed_type="sincos" if interpolation_scale is not None else None)).
        if cfg.get("interpolation_scale") is not None:
            raise ValueError("Sana configs with a positional embedding (interpolation_scale="
                             f"{cfg['interpolation_scale']!r}) are not supported by this port")
        if cfg.get("qk_norm") is not None:
            raise ValueError(f"qk_norm={cfg['qk_norm']!r} is not supported by this port")
        if cfg.get("guidance_embeds", False):
            raise ValueError("guidance_embeds=True (guidance-distilled Sana) is not supported by this port")
        if float(cfg.get("timestep_scale", 1.0)) != 1.0:
            # The diffusers pipeline (not the model) multiplies timesteps by it (Sana-Sprint).
            raise ValueError(f"timestep_scale={cfg['timestep_scale']!r} != 1 is not supported by this port")
        if cfg.get("attention_bias", False):
            raise ValueError("attention_bias=True (biased linear-attention qkv) is not supported by this port")
        if cfg.get("norm_elementwise_affine", False):
            raise ValueError("norm_elementwise_affine=True is not supported by this port")

        heads = int(cfg.get("num_attention_heads", 70))
        head_dim = int(cfg.get("attention_head_dim", 32))
        hidden = heads * head_dim
        cross_heads = cfg.get("num_cross_attention_heads", 20)
        cross_head_dim = cfg.get("cross_attention_head_dim", 112)
        cross_dim = cfg.get("cross_attention_dim", 2240)
        if cross_heads is None or cross_head_dim is None or cross_dim is None:
            raise ValueError("Sana without cross-attention is not supported by this port")
        if int(cross_dim) != hidden:
            raise ValueError(f"cross_attention_dim {cross_dim} must equal the hidden size {hidden}")
        if int(cross_heads) * int(cross_head_dim) != hidden:
            raise ValueError(f"cross-attention {cross_heads} x {cross_head_dim} does not span the hidden "
                             f"size {hidden}")
        in_ch = int(cfg.get("in_channels", 32))
        return cls(
            in_channels=in_ch,
            out_channels=int(cfg.get("out_channels") or in_ch),
            patch_size=int(cfg.get("patch_size", 1)),
            hidden_size=hidden,
            depth=int(cfg.get("num_layers", 20)),
            linear_head_dim=head_dim,
            cross_num_heads=int(cross_heads),
            mlp_ratio=float(cfg.get("mlp_ratio", 2.5)),
            caption_channels=int(cfg.get("caption_channels", 2304)),
            norm_eps=float(cfg.get("norm_eps", 1e-6)),
        )

    @classmethod
    def infer(cls, sd: dict) -> "LinearDiTParams":
        """Params from the tensor shapes of a Sana-layout state dict.

        Head counts are not visible in shapes: the linear head dim is taken as 32 (every released Sana),
        and the cross-attention head dim as 112 if it divides hidden (1600M/4.8B: 20 x 112), else 72
        (600M: 16 x 72), else 64.
        """
        for key in ("x_embedder.proj.weight", "final_layer.linear.weight", "y_embedder.y_proj.fc1.weight",
                    "blocks.0.mlp.point_conv.conv.weight"):
            if key not in sd:
                raise ValueError(f"not a Sana-layout state dict: missing {key!r}")
        hidden, in_ch, p, p2 = sd["x_embedder.proj.weight"].shape
        if p != p2:
            raise ValueError(f"non-square patch {p}x{p2} is not supported")
        out_rows = sd["final_layer.linear.weight"].shape[0]
        if out_rows % (p * p):
            raise ValueError(f"final_layer.linear has {out_rows} rows, not a multiple of patch^2 {p * p}")
        ids = {int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
        depth = len(ids)
        if ids != set(range(depth)):
            raise ValueError(f"block indices are not contiguous from 0: {sorted(ids)}")
        mlp_hidden = sd["blocks.0.mlp.point_conv.conv.weight"].shape[1]
        ratio = mlp_hidden / hidden
        if int(hidden * ratio) != mlp_hidden:  # float rounding: nudge so int(hidden*ratio) round-trips
            ratio = math.nextafter(ratio, math.inf)
        cross_head_dim = 112 if hidden % 112 == 0 else 72 if hidden % 72 == 0 else 64
        if hidden % cross_head_dim:
            raise ValueError(f"cannot infer cross-attention heads for hidden size {hidden}")
        return cls(
            in_channels=int(in_ch),
            out_channels=int(out_rows // (p * p)),
            patch_size=int(p),
            hidden_size=int(hidden),
            depth=depth,
            linear_head_dim=32,
            cross_num_heads=int(hidden // cross_head_dim),
            mlp_ratio=ratio,
            caption_channels=int(sd["y_embedder.y_proj.fc1.weight"].shape[1]),
        )


# ---------------------------------------------------------------------------------------------------
# State-dict layouts
# ---------------------------------------------------------------------------------------------------

_MARKERS = {"x_embedder.proj.weight": "sana", "patch_embed.proj.weight": "diffusers"}
_CONFIRM = {"sana": "blocks.0.mlp.inverted_conv.conv.weight", "diffusers": "transformer_blocks.0.ff.conv_inverted.weight"}

# Whole-module renames diffusers -> Sana (the fused qkv / kv weights are handled separately).
_DIFFUSERS_RENAMES = [
    ("patch_embed.proj.", "x_embedder.proj."),
    ("time_embed.emb.timestep_embedder.linear_1.", "t_embedder.mlp.0."),
    ("time_embed.emb.timestep_embedder.linear_2.", "t_embedder.mlp.2."),
    ("time_embed.linear.", "t_block.1."),
    ("caption_projection.linear_1.", "y_embedder.y_proj.fc1."),
    ("caption_projection.linear_2.", "y_embedder.y_proj.fc2."),
    ("caption_norm.weight", "attention_y_norm.weight"),
    ("proj_out.", "final_layer.linear."),
    ("scale_shift_table", "final_layer.scale_shift_table"),
]
_DIFFUSERS_BLOCK_RENAMES = [
    ("scale_shift_table", "scale_shift_table"),
    ("attn1.to_out.0.", "attn.proj."),
    ("attn2.to_q.", "cross_attn.q_linear."),
    ("attn2.to_out.0.", "cross_attn.proj."),
    ("ff.conv_inverted.", "mlp.inverted_conv.conv."),
    ("ff.conv_depth.", "mlp.depth_conv.conv."),
    ("ff.conv_point.", "mlp.point_conv.conv."),
]
# Buffers that original checkpoints carry but the model recomputes or does not use.
_DROPPED = ("y_embedder.y_embedding", "pos_embed", "patch_embed.pos_embed")


def _describe(sd: dict) -> str | None:
    """A guess at what a non-Sana state dict is, for the error message."""
    keys = list(sd)
    has = lambda s: any(s in k for k in keys)  # noqa: E731
    if has("double_blocks") or has("single_blocks"):
        return "a Flux model"
    if has("joint_blocks"):
        return "an SD3 model"
    if has("decoder.up_blocks") or has("decoder.up.") or has("encoder.down_blocks") or has("encoder.down."):
        return "a VAE"
    if has("encoder.layer.") or has("embeddings.word_embeddings"):
        return "an XLM-R/BERT text encoder"
    if has("encoder.block.") or has("shared.weight"):
        return "a T5 text encoder"
    if has("model.layers.") or has("embed_tokens"):
        return "a decoder-only LLM (e.g. a Gemma text encoder)"
    if (has("down_blocks") and has("time_embedding")) or has("input_blocks."):
        return "a UNet"
    if has("adaln_single") or has("t_block") and not has("attn.qkv"):
        return "a PixArt model"
    if has("lora_") or has(".lora."):
        return "a LoRA"
    return None


def _strip_prefix(sd: dict) -> tuple[dict, str]:
    """Find the layout marker key and drop whatever prefix (model.diffusion_model., module., net., ...)
    sits in front of it; keys outside that prefix belong to other models in the file and are dropped."""
    if not sd:
        raise ValueError("empty state dict: expected a Sana/Waifu transformer")
    for key in sd:
        for marker, layout in _MARKERS.items():
            if key.endswith(marker) and (key == marker or key[: -len(marker)].endswith(".")):
                prefix = key[: -len(marker)]
                out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
                # A patch-embed key alone is common to many DiTs: also require Sana's GLUMBConv FFN.
                if _CONFIRM[layout] in out:
                    return out, layout
    what = _describe(sd)
    sample = ", ".join(list(sd)[:3])
    raise ValueError(
        "not a Sana/Waifu transformer state dict"
        + (f": it looks like {what}" if what else "")
        + f" (no Sana patch embedder + GLUMBConv keys such as 'x_embedder.proj.weight' and "
        f"'blocks.0.mlp.inverted_conv.conv.weight'; first keys: {sample})"
    )


def detect_layout(sd: dict) -> str:
    """'diffusers' or 'sana' (original NVlabs key names); ValueError if neither."""
    return _strip_prefix(sd)[1]


def to_sana_layout(sd: dict) -> dict:
    """Convert a diffusers- or Sana-layout transformer state dict (optionally prefixed) to Sana layout."""
    sd, layout = _strip_prefix(sd)
    if layout == "sana":
        return {k: v for k, v in sd.items() if k not in _DROPPED}

    out, fused = {}, {}
    for key, value in sd.items():
        if key in _DROPPED:
            continue
        m = re.match(r"transformer_blocks\.(\d+)\.(.+)$", key)
        if m:
            i, rest = m.groups()
            part = re.match(r"(attn1|attn2)\.to_(q|k|v)\.(weight|bias)$", rest)
            if part and not (part.group(1) == "attn2" and part.group(2) == "q"):
                attn, which, kind = part.groups()
                if attn == "attn1" and kind == "bias":
                    raise ValueError("linear-attention qkv bias (attention_bias=True) is not supported")
                target = f"blocks.{i}.attn.qkv.{kind}" if attn == "attn1" else f"blocks.{i}.cross_attn.kv_linear.{kind}"
                fused.setdefault(target, {})[which] = value
                continue
            for old, new in _DIFFUSERS_BLOCK_RENAMES:
                if rest.startswith(old):
                    out[f"blocks.{i}.{new}{rest[len(old):]}"] = value
                    break
            else:
                raise ValueError(f"unsupported diffusers Sana key {key!r} (qk_norm or another feature this "
                                 "port does not implement)")
            continue
        for old, new in _DIFFUSERS_RENAMES:
            if key.startswith(old):
                out[new + key[len(old):]] = value
                break
        else:
            raise ValueError(f"unsupported diffusers Sana key {key!r} (guidance embedding or another feature "
                             "this port does not implement)")
    for target, parts in fused.items():
        order = "qkv" if ".attn.qkv." in target else "kv"  # rows q|k|v and k|v, as in original Sana
        if set(parts) != set(order):
            raise ValueError(f"incomplete projections for {target}: have {sorted(parts)}")
        out[target] = torch.cat([parts[c] for c in order], dim=0)
    return out


# ---------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------

def relu_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """Sana's ReLU linear attention as the model defines it, written plainly (differentiable): token-major
    [B, N, heads, dim] q, k, v in, the same shape out in q's dtype; state and divide in fp32, as in both reference
    implementations: O_n = sum_m (relu(q_n) . relu(k_m)) v_m / (relu(q_n) . sum_m relu(k_m) + eps).

    The model runs the op it was built with (``attention=``): the pack passes ``kernels.linear_attention``
    (Triton on CUDA, a tuned eager twin elsewhere; inference only), tested against this one."""
    dtype = q.dtype
    q, k, v = (t.float().transpose(1, 2) for t in (q, k, v))       # [B, H, N, D]
    q, k = q.clamp_min(0), k.clamp_min(0)
    kv = k.transpose(-1, -2) @ v                                    # [B, H, D, D]
    denominator = q @ k.sum(dim=2).unsqueeze(-1)                    # [B, H, N, 1]
    return ((q @ kv) / (denominator + eps)).transpose(1, 2).contiguous().to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * cast_like(self.weight, x)


class LinearSelfAttention(nn.Module):
    """Sana LiteLA: fused qkv (no bias), ReLU linear attention, biased output projection."""

    def __init__(self, hidden, heads, eps, dtype=None, device=None, operations=TorchOps, attention=None):
        super().__init__()
        self.heads, self.eps = heads, eps
        self.attention = attention or relu_linear_attention
        self.qkv = operations.Linear(hidden, 3 * hidden, bias=False, dtype=dtype, device=device)
        self.proj = operations.Linear(hidden, hidden, bias=True, dtype=dtype, device=device)

    def forward(self, x):
        B, N, C = x.shape
        # Strided token-major views of the qkv output: no transposes.
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).unbind(2)
        # A fast op is for inference; when a gradient flows through attention, the plain formula runs.
        attend = relu_linear_attention if q.requires_grad else self.attention
        out = self.proj(attend(q, k, v, self.eps).reshape(B, N, C))
        if out.dtype == torch.float16:  # as upstream: keep fp16 finite
            out = out.clip(-65504, 65504)
        return out


class CrossAttention(nn.Module):
    """Softmax cross-attention to the caption tokens. K/V depend only on the caption, so
    :meth:`cross_kv` is separate and its result may be cached and passed back as ``kv``."""

    def __init__(self, hidden, heads, dtype=None, device=None, operations=TorchOps):
        super().__init__()
        self.heads = heads
        self.q_linear = operations.Linear(hidden, hidden, bias=True, dtype=dtype, device=device)
        self.kv_linear = operations.Linear(hidden, 2 * hidden, bias=True, dtype=dtype, device=device)
        self.proj = operations.Linear(hidden, hidden, bias=True, dtype=dtype, device=device)

    def cross_kv(self, context):
        """context [B, L, hidden] -> (k, v), each head-major [B, heads, L, dim]."""
        B, L, C = context.shape
        k, v = self.kv_linear(context).view(B, L, 2, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x, context=None, mask_bias=None, kv=None):
        B, N, C = x.shape
        k, v = self.cross_kv(context) if kv is None else kv
        q = self.q_linear(x).view(B, N, self.heads, C // self.heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_bias)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class _Conv(nn.Module):
    """Holder so the keys read ``mlp.<name>.conv.*`` like the original ConvLayer."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


class GLUMBConv(nn.Module):
    """1x1 expand to 2*hidden, SiLU, 3x3 depthwise, GLU (value * SiLU(gate)), 1x1 project (no bias)."""

    def __init__(self, dim, hidden, dtype=None, device=None, operations=TorchOps):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.inverted_conv = _Conv(operations.Conv2d(dim, 2 * hidden, 1, bias=True, **kw))
        self.depth_conv = _Conv(operations.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden,
                                                  bias=True, **kw))
        self.point_conv = _Conv(operations.Conv2d(hidden, dim, 1, bias=False, **kw))

    def forward(self, x):
        # In place where nothing needs the pre-activation (no autograd): fresh multi-MB activations cost page
        # faults on CPU, and the conv outputs are ours alone.
        inplace = not torch.is_grad_enabled()
        x = self.depth_conv(F.silu(self.inverted_conv(x), inplace=inplace))
        value, gate = x.chunk(2, dim=1)
        gate = F.silu(gate, inplace=inplace)
        return self.point_conv(value.mul_(gate) if inplace else value * gate)


class SanaBlock(nn.Module):
    def __init__(self, p: LinearDiTParams, dtype=None, device=None, operations=TorchOps, attention=None):
        super().__init__()
        H = p.hidden_size
        self.norm1 = operations.LayerNorm(H, elementwise_affine=False, eps=p.norm_eps, dtype=dtype, device=device)
        self.attn = LinearSelfAttention(H, p.num_heads, p.linear_eps, dtype, device, operations, attention)
        self.cross_attn = CrossAttention(H, p.cross_num_heads, dtype, device, operations)
        self.norm2 = operations.LayerNorm(H, elementwise_affine=False, eps=p.norm_eps, dtype=dtype, device=device)
        self.mlp = GLUMBConv(H, p.mlp_hidden, dtype, device, operations)
        self.scale_shift_table = nn.Parameter(torch.zeros(6, H, dtype=dtype, device=device))

    def forward(self, x, t0, context, mask_bias, hw, kv=None):
        B, N, C = x.shape
        mod = cast_like(self.scale_shift_table, x)[None] + t0.view(B, 6, C)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)

        # addcmul: modulate and gate in one pass each (x + a * b).
        x = torch.addcmul(x, gate_msa, self.attn(torch.addcmul(shift_msa, self.norm1(x), 1 + scale_msa)))
        # Cross-attention has neither pre-norm nor gate in Sana.
        x = self.cross_attn(x, context, mask_bias, kv=kv).add_(x)   # the projection's fresh output: add in place

        h = torch.addcmul(shift_mlp, self.norm2(x), 1 + scale_mlp)
        h = h.transpose(1, 2).unflatten(2, hw)          # tokens -> [B, C, h, w], channels-last: no copy
        h = self.mlp(h).flatten(2).transpose(1, 2)
        return torch.addcmul(x, gate_mlp, h)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[cos, sin] sinusoid of (fractional) timesteps, in fp32 (t ~ 1000 loses precision in half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _TimestepEmbedder(nn.Module):
    def __init__(self, hidden, dtype=None, device=None, operations=TorchOps):
        super().__init__()
        self.mlp = nn.Sequential(operations.Linear(256, hidden, bias=True, dtype=dtype, device=device),
                                 nn.SiLU(),
                                 operations.Linear(hidden, hidden, bias=True, dtype=dtype, device=device))

    def forward(self, t, dtype):
        return self.mlp(timestep_embedding(t).to(dtype))


class _CaptionMlp(nn.Module):
    def __init__(self, cin, hidden, dtype=None, device=None, operations=TorchOps):
        super().__init__()
        self.fc1 = operations.Linear(cin, hidden, bias=True, dtype=dtype, device=device)
        self.fc2 = operations.Linear(hidden, hidden, bias=True, dtype=dtype, device=device)

    def forward(self, y):
        return self.fc2(F.gelu(self.fc1(y), approximate="tanh"))


class _CaptionEmbedder(nn.Module):
    def __init__(self, cin, hidden, dtype=None, device=None, operations=TorchOps):
        super().__init__()
        self.y_proj = _CaptionMlp(cin, hidden, dtype, device, operations)

    def forward(self, y):
        return self.y_proj(y)


class _PatchEmbed(nn.Module):
    def __init__(self, cin, hidden, p, dtype=None, device=None, operations=TorchOps):
        super().__init__()
        self.proj = operations.Conv2d(cin, hidden, p, stride=p, bias=True, dtype=dtype, device=device)

    def forward(self, x):
        # A channels-last input makes the conv's output token-major already: every later [B, N, C] op then
        # runs on contiguous tokens instead of copying a transposed view.
        return self.proj(x.contiguous(memory_format=torch.channels_last)).flatten(2).transpose(1, 2).contiguous()


class _FinalLayer(nn.Module):
    def __init__(self, hidden, cout, eps, dtype=None, device=None, operations=TorchOps):
        super().__init__()
        self.norm_final = operations.LayerNorm(hidden, elementwise_affine=False, eps=eps, dtype=dtype, device=device)
        self.linear = operations.Linear(hidden, cout, bias=True, dtype=dtype, device=device)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, hidden, dtype=dtype, device=device))

    def forward(self, x, temb):
        shift, scale = (cast_like(self.scale_shift_table, x)[None] + temb[:, None]).chunk(2, dim=1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


@dataclass
class TextKV:
    """Per-image caption cache from :meth:`LinearDiT.encode_context`: per block (k, v), each [B, heads, L, dim],
    and the additive mask bias [B, 1, 1, L] (or None)."""
    kv: list
    mask_bias: "torch.Tensor | None"


class LinearDiT(nn.Module):
    """Sana Linear DiT; ``forward`` returns the velocity prediction. ``attention`` is the ReLU linear-attention op
    the blocks call (default :func:`relu_linear_attention`; the pack's nodes pass ``kernels.linear_attention``)."""

    def __init__(self, params: LinearDiTParams, dtype=None, device=None, operations=None, attention=None):
        super().__init__()
        ops = operations or TorchOps
        p = self.params = params
        H = p.hidden_size
        self.x_embedder = _PatchEmbed(p.in_channels, H, p.patch_size, dtype, device, ops)
        self.t_embedder = _TimestepEmbedder(H, dtype, device, ops)
        self.t_block = nn.Sequential(nn.SiLU(), ops.Linear(H, 6 * H, bias=True, dtype=dtype, device=device))
        self.y_embedder = _CaptionEmbedder(p.caption_channels, H, dtype, device, ops)
        self.attention_y_norm = RMSNorm(H, p.caption_norm_eps, dtype=dtype, device=device)
        self.blocks = nn.ModuleList(SanaBlock(p, dtype, device, ops, attention) for _ in range(p.depth))
        self.final_layer = _FinalLayer(H, p.out_channels * p.patch_size ** 2, 1e-6, dtype, device, ops)

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    def _mask_bias(self, attention_mask, B, L, dtype, device):
        """1 = real / 0 = pad  ->  additive bias [B, 1, 1, L]: (1 - mask) * -10000, as diffusers does."""
        if attention_mask is None:
            return None
        m = attention_mask
        if m.ndim == 3 and m.shape[1] == 1:
            m = m[:, 0]
        if m.ndim != 2 or m.shape[-1] != L or m.shape[0] not in (1, B):
            raise ValueError(f"attention_mask must be [B, L] = [{B}, {L}], got {tuple(attention_mask.shape)}")
        bias = (1.0 - m.to(device=device, dtype=torch.float32)) * -10000.0
        return bias.to(dtype)[:, None, None, :]

    def encode_context(self, context, attention_mask=None, dtype=None) -> "TextKV":
        """Everything the blocks need from the caption, computed once per image instead of once per step:
        the caption projection + norm, the additive mask bias and every block's cross-attention K/V.
        Pass the result as ``forward(..., kv_cache=...)`` (``context``/``attention_mask`` are then ignored)."""
        dtype = dtype or context.dtype
        B, L = context.shape[:2]
        ctx = self.attention_y_norm(self.y_embedder(context.to(dtype)))
        mask_bias = self._mask_bias(attention_mask, B, L, dtype, context.device)
        return TextKV([block.cross_attn.cross_kv(ctx) for block in self.blocks], mask_bias)

    def forward(self, x, timesteps, context, attention_mask=None, kv_cache: "TextKV | None" = None, **kwargs):
        # kwargs: ComfyUI's transformer_options / control etc. are accepted and ignored.
        p = self.params
        B, _, Hi, Wi = x.shape
        if Hi % p.patch_size or Wi % p.patch_size:
            raise ValueError(f"latent size {Hi}x{Wi} is not a multiple of patch_size {p.patch_size}")
        hw = (Hi // p.patch_size, Wi // p.patch_size)
        dtype = x.dtype  # compute dtype is the input's (ComfyUI casts latents to the model's compute dtype)

        tokens = self.x_embedder(x)
        t = torch.as_tensor(timesteps, device=x.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(B)
        temb = self.t_embedder(t, dtype)                 # [B, H], also drives the final layer
        t0 = self.t_block(temb)                          # [B, 6H] block modulation

        if kv_cache is None:
            context = self.attention_y_norm(self.y_embedder(context.to(dtype)))
            mask_bias = self._mask_bias(attention_mask, B, context.shape[1], dtype, x.device)
            for block in self.blocks:
                tokens = block(tokens, t0, context, mask_bias, hw)
        else:
            if len(kv_cache.kv) != len(self.blocks):
                raise ValueError(f"kv_cache has {len(kv_cache.kv)} blocks, the model {len(self.blocks)}")
            for block, kv in zip(self.blocks, kv_cache.kv):
                tokens = block(tokens, t0, None, kv_cache.mask_bias, hw, kv=kv)

        out = self.final_layer(tokens, temb)             # [B, h*w, p*p*C]
        ps = p.patch_size
        out = out.reshape(B, hw[0], hw[1], ps, ps, p.out_channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(B, p.out_channels, Hi, Wi)
