"""MEXMA-SigLIP (visheratin/mexma-siglip) beyond the text tower: the 1024->1152 text projector, the SigLIP
so400m vision tower with its attention-pooling head, the pooled ``encode_texts`` / ``encode_images``, and the
resolver for every published layout.

Provenance: the vision tower is written from the architecture of transformers' ``SiglipVisionModel``
(transformers/models/siglip/modeling_siglip.py, read in 5.x): pre-LN ViT, gelu-tanh MLP, LayerNorm eps 1e-6,
multi-head attention-pooling head over a learned probe; parameter names follow its state dict. The pooled
text embedding follows ``encode_texts`` of huggingface.co/visheratin/mexma-siglip as the AiArtLab/sdxs model
card calls it, with MEXMA's CLS pooling (facebook/MEXMA): last_hidden_state[:, 0] (the ``<s>`` token) through
``text_projector``, no L2 normalisation (SDXS feeds it unnormalised as a single cross-attention token).

Layouts accepted by ``resolve_mexma``: the single visheratin file (``text_model.*``, ``text_projector.*``,
``vision_model.*``, ``logit_scale``, ``logit_bias``), an AiArtLab snapshot whose ``text_encoder/`` holds that
file or only the XLM-R tower with a sibling ``text_projector/`` folder, and the Waifu text encoder (no
projector, no vision tower: the pooled mode then reports the missing projector weights).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import loading
from ..ops import TorchOps, cast_like
from .xlmr import XLMRobertaParams, XLMRobertaTextModel, to_native_layout as xlmr_native
from ..registry import fetch_hint

MISSING_PROJECTOR = ("missing projector weights: this MEXMA-SigLIP text encoder has no text_projector "
                     "(1024->1152), which SDXS conditions on. Load the full visheratin/mexma-siglip model.safetensors "
                     "or the AiArtLab/sdxs snapshot (text_encoder/ + text_projector/), not the Waifu text encoder")
MISSING_VISION = ("missing vision tower: this MEXMA-SigLIP has no vision_model weights, so it cannot embed "
                  "images. Load the full visheratin/mexma-siglip model.safetensors")


@dataclass
class SiglipVisionParams:
    hidden_size: int = 1152
    num_layers: int = 27
    num_heads: int = 16
    intermediate_size: int = 4304
    patch_size: int = 14
    image_size: int = 384
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "patch_size", "image_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"SiglipVisionParams.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size {self.image_size} is smaller than patch_size {self.patch_size}")

    @property
    def num_patches(self) -> int:
        # Like SiglipVisionEmbeddings: the stride-patch conv without padding reads the top-left
        # floor(side / patch) * patch pixels (so400m-patch14-384: 27 x 27 patches of a 384 x 384 input).
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "SiglipVisionParams":
        act = cfg.get("hidden_act", "gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
            raise ValueError(f"unsupported vision hidden_act {act!r} (SigLIP uses gelu_pytorch_tanh)")
        if cfg.get("vision_use_head", True) is False:
            raise ValueError("vision_use_head=False: MEXMA-SigLIP pools with the attention head")
        d = cls()
        return cls(hidden_size=cfg.get("hidden_size", d.hidden_size), num_layers=cfg.get("num_hidden_layers", d.num_layers),
                   num_heads=cfg.get("num_attention_heads", d.num_heads),
                   intermediate_size=cfg.get("intermediate_size", d.intermediate_size),
                   patch_size=cfg.get("patch_size", d.patch_size), image_size=cfg.get("image_size", d.image_size),
                   layer_norm_eps=cfg.get("layer_norm_eps", d.layer_norm_eps))

    @classmethod
    def infer(cls, sd: dict) -> "SiglipVisionParams":
        """From shapes. The head count is not in the shapes: SigLIP towers use 72-dim heads when the width
        allows it (so400m: 1152 = 16 x 72), else 64 (base/large). Nor is the image side: any side from
        grid * patch to grid * patch + patch - 1 fills the position table, so this takes grid * patch and
        ``resolve_mexma`` replaces it by the processor's size (preprocessor_config.json)."""
        hidden, _, patch, _ = sd["embeddings.patch_embedding.weight"].shape
        grid = math.isqrt(sd["embeddings.position_embedding.weight"].shape[0])
        layers = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
        return cls(hidden_size=hidden, num_layers=max(layers) + 1,
                   num_heads=hidden // 72 if hidden % 72 == 0 else hidden // 64,
                   intermediate_size=sd["encoder.layers.0.mlp.fc1.weight"].shape[0], patch_size=patch,
                   image_size=grid * patch)


# ----------------------------------------------------------------------------- state-dict layout

def split_mexma(sd: dict) -> tuple[dict, Optional[dict], Optional[dict]]:
    """(text-tower keys, projector {"weight", "bias"?} or None, vision keys (native) or None)."""
    text, proj, vision = {}, {}, {}
    for key, value in sd.items():
        if "text_projector." in key:
            proj[key.split("text_projector.", 1)[1]] = value
        elif "vision_model." in key:
            vision[key.rsplit("vision_model.", 1)[1]] = value  # also under a nested vision_model.vision_model.
        elif key.endswith(("logit_scale", "logit_bias")) or "vision_projector." in key:
            continue
        else:
            text[key] = value
    return text, (projector_from(proj, "text_projector") if proj else None), (vision or None)


def projector_from(sd: dict, where: str) -> dict:
    """A Linear's {"weight", "bias"?} from a projector's tensors, whatever their key prefix."""
    mats = [v for v in sd.values() if v.ndim == 2]
    vecs = [v for v in sd.values() if v.ndim == 1]
    if len(mats) != 1 or len(vecs) > 1 or len(mats) + len(vecs) != len(sd):
        raise ValueError(f"{where}: expected one Linear (a 2-D weight and optionally a bias), found "
                         f"{[(k, tuple(v.shape)) for k, v in list(sd.items())[:6]]}")
    out = {"weight": mats[0]}
    if vecs:
        if vecs[0].shape[0] != mats[0].shape[0]:
            raise ValueError(f"{where}: bias {tuple(vecs[0].shape)} does not fit weight {tuple(mats[0].shape)}")
        out["bias"] = vecs[0]
    return out


# ----------------------------------------------------------------------------- prompt preparation

# How each published pipeline hands the prompt to the tokenizer. XLM-R is case-sensitive and its Metaspace
# pre-tokenizer keeps a leading space, so these give other tokens, other conditioning and another image.
#  - Waifu (AiArtLab/waifu-2b pipeline_waifu.py, WaifuPipeline) lower-cases and strips;
#  - SDXS (the AiArtLab/sdxs model card's code) and visheratin/mexma-siglip's own usage pass it as typed.
# "auto" prepares each part of the conditioning for the model that reads it: the per-token states (only
# Waifu reads them) from the lower-cased, stripped prompt; the pooled, projected vector (only SDXS reads it)
# from the prompt as typed. So one encoder node is right for either model whichever loader gave the encoder.
PROMPT_FORMATS = ("auto", "lowercase+strip", "as typed")


def waifu_prompt(text: str) -> str:
    return text.lower().strip()


def prompt_texts(text: str, prompt_format: str = "auto") -> tuple[str, str]:
    """(text for the per-token states, text for the pooled vector) under ``prompt_format``."""
    if prompt_format == "auto":
        return waifu_prompt(text), text
    if prompt_format == "lowercase+strip":
        return waifu_prompt(text), waifu_prompt(text)
    if prompt_format == "as typed":
        return text, text
    raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")


# ----------------------------------------------------------------------------- modules


class MexmaSigLIPText(nn.Module):
    """The text side: XLM-R tower (``text_model.*``) and the optional ``text_projector`` (Linear 1024->1152).

    ``forward(ids, mask) -> (last_hidden_state [B,L,1024], pooled [B,1152] or None)``."""

    def __init__(self, params: XLMRobertaParams, projector_dim: Optional[int] = None, projector_bias: bool = True,
                 dtype=None, device=None, operations=None):
        super().__init__()
        ops = operations or TorchOps
        self.text_model = XLMRobertaTextModel(params, dtype=dtype, device=device, operations=ops)
        self.text_projector = None
        if projector_dim:
            self.text_projector = ops.Linear(params.hidden_size, projector_dim, bias=projector_bias,
                                             dtype=dtype, device=device)

    def encode_texts(self, input_ids, attention_mask, normalize: bool = False):
        """MEXMA-SigLIP's pooled text embedding: the first token's state, projected (SDXS: not normalised)."""
        return self.forward(input_ids, attention_mask, normalize)[1]

    def forward(self, input_ids, attention_mask=None, normalize: bool = False):
        hidden = self.text_model(input_ids, attention_mask)
        pooled = None
        if self.text_projector is not None:
            pooled = self.text_projector(hidden[:, 0])
            if normalize:
                pooled = F.normalize(pooled, dim=-1)
        return hidden, pooled


class _VisionEmbeddings(nn.Module):
    def __init__(self, p: SiglipVisionParams, dtype, device, ops):
        super().__init__()
        self.patch_embedding = ops.Conv2d(3, p.hidden_size, p.patch_size, stride=p.patch_size, dtype=dtype, device=device)
        self.position_embedding = ops.Embedding(p.num_patches, p.hidden_size, dtype=dtype, device=device)

    def forward(self, pixels):
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        pos = torch.arange(x.shape[1], device=x.device)
        return x + self.position_embedding(pos)[None]


class _VisionAttention(nn.Module):
    def __init__(self, p, dtype, device, ops):
        super().__init__()
        self.heads = p.num_heads
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self, name, ops.Linear(p.hidden_size, p.hidden_size, dtype=dtype, device=device))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, -1).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class _MLP(nn.Module):
    def __init__(self, p, dtype, device, ops):
        super().__init__()
        self.fc1 = ops.Linear(p.hidden_size, p.intermediate_size, dtype=dtype, device=device)
        self.fc2 = ops.Linear(p.intermediate_size, p.hidden_size, dtype=dtype, device=device)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class _VisionLayer(nn.Module):
    def __init__(self, p, dtype, device, ops):
        super().__init__()
        self.layer_norm1 = ops.LayerNorm(p.hidden_size, eps=p.layer_norm_eps, dtype=dtype, device=device)
        self.self_attn = _VisionAttention(p, dtype, device, ops)
        self.layer_norm2 = ops.LayerNorm(p.hidden_size, eps=p.layer_norm_eps, dtype=dtype, device=device)
        self.mlp = _MLP(p, dtype, device, ops)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _VisionEncoder(nn.Module):
    def __init__(self, p, dtype, device, ops):
        super().__init__()
        self.layers = nn.ModuleList([_VisionLayer(p, dtype, device, ops) for _ in range(p.num_layers)])


class _PoolAttention(nn.Module):
    """torch.nn.MultiheadAttention's parameters (in_proj_weight/bias, out_proj), computed explicitly so
    that host ops can cast them."""

    def __init__(self, p, dtype, device, ops):
        super().__init__()
        self.heads = p.num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * p.hidden_size, p.hidden_size, dtype=dtype, device=device))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * p.hidden_size, dtype=dtype, device=device))
        self.out_proj = ops.Linear(p.hidden_size, p.hidden_size, dtype=dtype, device=device)

    def forward(self, query, x):
        w, b = cast_like(self.in_proj_weight, x), cast_like(self.in_proj_bias, x)
        c = x.shape[-1]
        q = F.linear(query, w[:c], b[:c])
        k = F.linear(x, w[c:2 * c], b[c:2 * c])
        v = F.linear(x, w[2 * c:], b[2 * c:])
        B = x.shape[0]
        q, k, v = (t.view(B, -1, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, -1, c)
        return self.out_proj(out)


class _PoolHead(nn.Module):
    def __init__(self, p, dtype, device, ops):
        super().__init__()
        self.probe = nn.Parameter(torch.empty(1, 1, p.hidden_size, dtype=dtype, device=device))
        self.attention = _PoolAttention(p, dtype, device, ops)
        self.layernorm = ops.LayerNorm(p.hidden_size, eps=p.layer_norm_eps, dtype=dtype, device=device)
        self.mlp = _MLP(p, dtype, device, ops)

    def forward(self, x):
        h = self.attention(cast_like(self.probe, x).expand(x.shape[0], -1, -1), x)
        h = h + self.mlp(self.layernorm(h))
        return h[:, 0]


class SiglipVisionTower(nn.Module):
    """``forward(pixel_values [B,3,S,S] in -1..1) -> pooled [B, hidden]`` (MEXMA-SigLIP ``encode_images``).
    Keys: SiglipVisionTransformer's (embeddings.*, encoder.layers.N.*, post_layernorm.*, head.*)."""

    def __init__(self, params: SiglipVisionParams = None, dtype=None, device=None, operations=None):
        super().__init__()
        self.params = p = params or SiglipVisionParams()
        ops = operations or TorchOps
        self.embeddings = _VisionEmbeddings(p, dtype, device, ops)
        self.encoder = _VisionEncoder(p, dtype, device, ops)
        self.post_layernorm = ops.LayerNorm(p.hidden_size, eps=p.layer_norm_eps, dtype=dtype, device=device)
        self.head = _PoolHead(p, dtype, device, ops)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        s = self.params.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or tuple(pixel_values.shape[2:]) != (s, s):
            raise ValueError(f"pixel_values must be [B,3,{s},{s}], got {tuple(pixel_values.shape)}; "
                             "use SiglipImageProcessing")
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.head(self.post_layernorm(x))

    encode_images = forward


MISSING_PROCESSOR = ("missing preprocessor_config.json: the image side and normalisation this SigLIP tower was "
                     "trained with are not in its weights (so400m-patch14-384 takes 384 x 384, of which the patch "
                     "conv reads 378 x 378). Put visheratin/mexma-siglip's preprocessor_config.json beside the model "
                     "(or as <name>.preprocessor_config.json beside a single file)")


@dataclass(frozen=True)
class SiglipImageProcessing:
    """transformers' ``SiglipImageProcessor`` (5.x, torchvision backend; models/siglip/image_processing_siglip.py and
    image_processing_backends.py) as configured by a ``preprocessor_config.json``: resize to height x width
    (bicubic, antialiased, on the uint8 image), then rescale and normalise in one step,
    (x - mean / rescale) / (std / rescale)."""
    height: int
    width: int
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)

    @classmethod
    def from_config(cls, cfg: dict) -> "SiglipImageProcessing":
        """The settings this class implements; a processor setting it does not (another resample, size kind,
        crop, pad) is refused by name rather than ignored. Fields that do not change pixels are not read."""
        kind = cfg.get("image_processor_type", "SiglipImageProcessor")
        if kind not in ("SiglipImageProcessor", "SiglipImageProcessorFast"):
            raise ValueError(f"image_processor_type {kind!r} is not SiglipImageProcessor")
        size = cfg.get("size")
        if not isinstance(size, dict) or set(size) != {"height", "width"}:
            raise ValueError(f"size {size!r}: only {{'height', 'width'}} is supported (SigLIP resizes to a fixed size)")
        if cfg.get("resample", 3) != 3:
            raise ValueError(f"resample {cfg.get('resample')!r}: only 3 (bicubic, SigLIP's) is supported")
        for flag in ("do_center_crop", "do_pad"):
            if cfg.get(flag):
                raise ValueError(f"{flag}=true is not supported (SigLIP's processor does not crop or pad)")
        if cfg.get("do_convert_rgb") is False:
            raise ValueError("do_convert_rgb=false is not supported (ComfyUI images are RGB)")
        mean, std = cfg.get("image_mean", [0.5] * 3), cfg.get("image_std", [0.5] * 3)
        mean = tuple(mean) * 3 if len(mean) == 1 else tuple(mean)
        std = tuple(std) * 3 if len(std) == 1 else tuple(std)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"image_mean {mean} / image_std {std}: expected 3 values each")
        return cls(height=int(size["height"]), width=int(size["width"]), do_resize=bool(cfg.get("do_resize", True)),
                   do_rescale=bool(cfg.get("do_rescale", True)),
                   rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
                   do_normalize=bool(cfg.get("do_normalize", True)), image_mean=mean, image_std=std)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """ComfyUI IMAGE [B,H,W,C] in 0..1 -> pixel_values [B,3,height,width] float32 (alpha dropped).

        The processor works on the 8-bit image a user loads (PIL/numpy uint8), so the IMAGE is quantised
        (round(x * 255)), exact for images that came from files. Resizing runs on the CPU like the processor's
        default: torch's native uint8 antialiased bicubic, which torchvision uses there (its GPU path resizes
        in float and rounds, and can differ by one level)."""
        if images.ndim != 4 or images.shape[-1] < 3:
            raise ValueError(f"expected an IMAGE [B,H,W,3], got shape {tuple(images.shape)}")
        x = (images[..., :3].detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
        x = x.permute(0, 3, 1, 2).contiguous()
        if self.do_resize and tuple(x.shape[-2:]) != (self.height, self.width):
            x = F.interpolate(x, size=(self.height, self.width), mode="bicubic", align_corners=False, antialias=True)
        elif not self.do_resize and tuple(x.shape[-2:]) != (self.height, self.width):
            raise ValueError(f"do_resize=false needs {self.height}x{self.width} images, got {tuple(x.shape[-2:])}")
        x = x.float()
        mean = torch.tensor(self.image_mean, dtype=torch.float32)
        std = torch.tensor(self.image_std, dtype=torch.float32)
        if self.do_normalize:
            if self.do_rescale:  # fused like the processor: mean and std in 0..255 units
                mean, std = mean * (1.0 / self.rescale_factor), std * (1.0 / self.rescale_factor)
            return (x - mean[:, None, None]) / std[:, None, None]
        return x * self.rescale_factor if self.do_rescale else x


def image_pixels(processing: Optional[SiglipImageProcessing], images: torch.Tensor, source) -> torch.Tensor:
    """pixel_values for the vision tower, or the MISSING_PROCESSOR error naming the model file."""
    if processing is None:
        raise ValueError(f"{source}: {MISSING_PROCESSOR}")
    return processing(images)


def find_processor_config(weights: Path) -> Optional[Path]:
    """A model's own preprocessor_config.json: ``<stem>.preprocessor_config.json`` beside a single file, or the
    one in its folder (visheratin/mexma-siglip keeps it beside model.safetensors)."""
    folder, stem = weights.parent, weights.name.split(".")[0]
    for c in (folder / f"{stem}.preprocessor_config.json", folder / "preprocessor_config.json"):
        if c.is_file():
            return c
    return None


# ----------------------------------------------------------------------------- resolving files


@dataclass
class ResolvedMexma:
    text_params: XLMRobertaParams
    text_state_dict: dict            # MexmaSigLIPText keys (text_model.*, text_projector.*)
    projector_dim: Optional[int]
    projector_bias: bool
    vision_params: Optional[SiglipVisionParams]
    vision_state_dict: Optional[dict]
    tokenizer: object
    source: Path
    image_processing: Optional[SiglipImageProcessing] = None  # None: no preprocessor_config.json (images refused)


def _is_xlmr_config(cfg: Optional[dict]) -> bool:
    return bool(cfg) and (cfg.get("model_type") in ("xlm-roberta", "roberta") or "num_hidden_layers" in cfg)


def _find_projector_folder(weights: Path) -> Optional[Path]:
    """AiArtLab/sdxs's later revisions store the projector in a text_projector/ folder beside text_encoder/."""
    for base in (weights.parent.parent, weights.parent):
        folder = base / "text_projector"
        if folder.is_dir() and any(folder.glob("*.safetensors")):
            return folder
    return None


def resolve_mexma(path: Path, tokenizer: Optional[Path] = None, hint: str = fetch_hint("mexma-siglip")) -> ResolvedMexma:
    """A MEXMA-SigLIP (or its XLM-R text tower) from a file, a component folder or a snapshot root (whose
    loader passes its own model's ``hint``)."""
    from .tokenizer import XLMRTokenizer
    sd, cfg, weights = loading.load_component(Path(path), "text_encoder", hint)
    text, proj, vision = split_mexma(sd)
    text = loading.convert_layout(xlmr_native, text, weights, "MEXMA-SigLIP / XLM-R text encoder")
    try:
        text_params = XLMRobertaParams.from_hf_config(cfg) if _is_xlmr_config(cfg) else XLMRobertaParams.infer(text)
    except (ValueError, KeyError) as e:
        raise loading.CheckpointError(f"{weights}: unsupported text-encoder config: {e}") from None
    if proj is None and (folder := _find_projector_folder(weights)) is not None:
        pw = loading.find_weights(folder, hint)
        try:
            proj = projector_from(loading.read_state_dict(pw, hint), str(pw))
        except ValueError as e:
            raise loading.CheckpointError(str(e)) from None
    out_sd = {f"text_model.{k}": v for k, v in text.items()}
    proj_dim = None
    if proj is not None:
        if proj["weight"].shape[1] != text_params.hidden_size:
            raise loading.CheckpointError(f"{weights}: text_projector takes {proj['weight'].shape[1]} features, the "
                                          f"text tower gives {text_params.hidden_size}")
        proj_dim = proj["weight"].shape[0]
        out_sd.update({f"text_projector.{k}": v for k, v in proj.items()})
    vision_params, processing = None, None
    if vision is not None:
        vision = {k: v for k, v in vision.items() if not k.endswith("position_ids")}
        vcfg = (cfg or {}).get("vision_config")
        try:
            vision_params = SiglipVisionParams.from_hf_config(vcfg) if vcfg else SiglipVisionParams.infer(vision)
        except (ValueError, KeyError) as e:
            raise loading.CheckpointError(f"{weights}: unsupported vision tower: {e}") from None
        # The processor decides the side (the weights only bound it); without its config we refuse images
        # rather than guess one (MISSING_PROCESSOR), and the text side still loads.
        if (pcfg := find_processor_config(weights)) is not None:
            try:
                processing = SiglipImageProcessing.from_config(loading.read_json(pcfg))
            except (ValueError, TypeError) as e:
                raise loading.CheckpointError(f"{pcfg}: unsupported image processor: {e}") from None
            rows = vision["embeddings.position_embedding.weight"].shape[0]
            grid = processing.height // vision_params.patch_size
            if processing.height != processing.width or grid * grid != rows:
                raise loading.CheckpointError(
                    f"{pcfg}: size {processing.height}x{processing.width} does not fit the vision tower of {weights} "
                    f"({rows} position rows, patch {vision_params.patch_size}): this processor config belongs to "
                    "another model")
            vision_params = replace(vision_params, image_size=processing.height)
    tok_path = tokenizer or loading.find_tokenizer(weights)
    try:
        tok = XLMRTokenizer.from_path(tok_path)
    except FileNotFoundError as e:
        raise loading.CheckpointError(f"{weights}: no tokenizer found: {e}") from None
    return ResolvedMexma(text_params, out_sd, proj_dim, proj is not None and "bias" in proj, vision_params, vision,
                         tok, weights, processing)
