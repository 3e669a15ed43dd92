"""ComfyUI glue for Würstchen v2: the three stages and the two CLIP text towers in ModelPatchers, loaded
through comfy.model_management, and the sampling loops of the reference pipelines.

Types: WUERSTCHEN_PRIOR (Stage C), WUERSTCHEN_DECODER (Stage B), WUERSTCHEN_CLIP (a text tower + tokenizer),
and the Stage A VQGAN as a ComfyUI ``VAE`` (native_vae.NativeVAE) (so the stock VAEDecode / VAEEncode work on Stage B latents).
``LATENT["samples"]`` holds Stage C embeddings already de-normalised (x*42-1, what Stage B consumes) or raw
Stage B latents (the VQGAN's 0.3764 scale is applied inside its decode, as the pipeline does).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image


from ..waifukit import loading
from ..waifukit.wuerstchen.clip_text import CLIPTextModel, resolve_clip_text
from ..waifukit.wuerstchen.paella_vq import PaellaVQ, resolve_vqgan
from ..waifukit.preview import fit_latent_rgb
from ..waifukit.registry import fetch_hint
from ..waifukit.wuerstchen.decoder import WuerstchenDiffNeXt, resolve_decoder
from ..waifukit.wuerstchen.prior import WuerstchenPrior, resolve_prior
from ..waifukit.wuerstchen.sched import WuerstchenDDPM, resolve_schedule, sample
from .common import param_count, pick_dtype
from .native_vae import WORKING_DTYPES, NativeVAE
from .core_api import LatentPreviewMethod, ModelPatcher, ProgressBar, cli_args, disable_weight_init, mm

# fp16 is known to break Stable Cascade's Stage C (NaN/black, Comfy-Org/ComfyUI#2824); nothing shows v2 is
# safe, so auto never picks it for Stage C/B: bf16 where supported, else fp32. fp16 stays an explicit choice.
STAGE_DTYPES = [torch.bfloat16, torch.float32]


def _scheduler(root: Path | None) -> WuerstchenDDPM:
    return WuerstchenDDPM(resolve_schedule(root))


def _snapshot_root(weights: Path, sub: str) -> Path | None:
    return weights.parent.parent if weights.parent.name == sub else None


class WuerstchenStage:
    """A Stage C or Stage B module in a ModelPatcher, with its scheduler and source."""

    def __init__(self, kind: str, module: nn.Module, dtype, source: Path, sched: WuerstchenDDPM,
                 load_device, offload_device):
        self.kind, self.module, self.dtype, self.source, self.sched = kind, module, dtype, source, sched
        self.params = module.params
        self.patcher = ModelPatcher(module, load_device=load_device, offload_device=offload_device)


def _load_stage(kind: str, resolver, cls, path: Path, dtype_choice: str, sub: str) -> WuerstchenStage:
    params, sd, weights = resolver(path)
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    dtype = pick_dtype(dtype_choice, load_device,
                       lambda: mm.unet_dtype(device=load_device, model_params=param_count(sd), supported_dtypes=STAGE_DTYPES))
    module = cls(params, operations=disable_weight_init, dtype=dtype, device=offload_device).eval()
    loading.load_strict(module, {k: v.to(dtype) for k, v in sd.items()}, weights)
    logging.info("comfyui-waifu: Würstchen %s from %s (%s)", kind, weights, dtype)
    return WuerstchenStage(kind, module, dtype, weights, _scheduler(_snapshot_root(weights, sub)), load_device,
                           offload_device)


def load_prior(path: Path, dtype_choice: str = "auto") -> WuerstchenStage:
    return _load_stage("Stage C prior", resolve_prior, WuerstchenPrior, path, dtype_choice, "prior")


def load_decoder(path: Path, dtype_choice: str = "auto") -> WuerstchenStage:
    return _load_stage("Stage B decoder", resolve_decoder, WuerstchenDiffNeXt, path, dtype_choice, "decoder")


class WuerstchenCLIP:
    """A CLIP text tower with its tokenizer. ``role`` says which stage it belongs to ("prior"/"decoder")."""

    def __init__(self, module: CLIPTextModel, tokenizer, source: Path, role: str, load_device, offload_device):
        self.module, self.tokenizer, self.source, self.role = module, tokenizer, source, role
        self.width = module.params.hidden_size
        self.patcher = ModelPatcher(module, load_device=load_device, offload_device=offload_device)

    def encode(self, texts: list[str]) -> torch.Tensor:
        """last_hidden_state [B,77,D] with the attention mask applied, as both Würstchen pipelines do."""
        ids, mask = self.tokenizer(texts, max_length=min(77, self.module.params.max_position_embeddings))
        mm.load_models_gpu([self.patcher])
        device = self.patcher.load_device
        with torch.inference_mode():
            hidden = self.module(ids.to(device), mask.to(device))
        return hidden.float().to(mm.intermediate_device())


def load_clip(path: Path, role: str, dtype_choice: str = "auto", tokenizer: Path | None = None) -> WuerstchenCLIP:
    params, sd, weights, tok = resolve_clip_text(path, tokenizer,
                                                 fetch_hint("wuerstchen-prior" if role == "prior" else "wuerstchen"))
    load_device, offload_device = mm.text_encoder_device(), mm.text_encoder_offload_device()
    dtype = pick_dtype(dtype_choice, load_device, lambda: mm.text_encoder_dtype(load_device))
    module = CLIPTextModel(params, operations=disable_weight_init, dtype=dtype, device=offload_device).eval()
    loading.load_strict(module, {k: v.to(dtype) for k, v in sd.items()}, weights)
    return WuerstchenCLIP(module, tok, weights, role, load_device, offload_device)


class _StageA(nn.Module):
    """What NativeVAE calls: decode(Stage B latents) and encode(pixels in [0,1]) in Stage B space."""

    def __init__(self, vq: PaellaVQ):
        super().__init__()
        self.vq = vq
        self.scale = vq.params.scale_factor

    def decode(self, z):
        if z.ndim != 4 or z.shape[1] != self.vq.params.latent_channels:
            raise ValueError(f"Würstchen Stage A decodes {self.vq.params.latent_channels}-channel Stage B latents "
                             f"[B,{self.vq.params.latent_channels},H/4,W/4]; got {tuple(z.shape)}. Stage C embeddings "
                             "(16 channels) go through WuerstchenStageB first.")
        return self.vq.decode(z * self.scale)

    def encode(self, x):
        return self.vq.encode(x) / self.scale


class WuerstchenVQGAN(NativeVAE):
    """The native Paella VQGAN as a ComfyUI VAE: pixels in [0, 1] as the VQGAN takes them."""

    def __init__(self, vq: PaellaVQ, source: Path, dtype):
        super().__init__(_StageA(vq), latent_channels=vq.params.latent_channels, ratio=vq.params.downscale,
                         source=source, dtype=dtype, to_model=lambda image: image,
                         from_model=lambda image: torch.clamp(image, min=0.0, max=1.0),
                         encode_bytes=1200, decode_bytes=1200 * 16)


def attach_previews(decoder: WuerstchenStage, vqgan: WuerstchenVQGAN) -> None:
    """Give Stage B latent previews: affine Stage-B-latent -> RGB factors fitted from this VQGAN's decoder."""
    try:
        module = vqgan.first_stage_model
        factors, bias = fit_latent_rgb(lambda z: module.decode(z) * 2 - 1, vqgan.latent_channels, 1.0,
                                       device=next(module.parameters()).device, dtype=vqgan.vae_dtype)
        decoder.preview_factors = (torch.tensor(factors).T.contiguous(), torch.tensor(bias))
    except Exception as e:  # previews are a convenience; never fail a load over them
        logging.warning("comfyui-waifu: no Stage B previews for %s: %s", vqgan.source, e)


def load_vqgan(path: Path, dtype_choice: str = "auto") -> WuerstchenVQGAN:
    params, sd, weights = resolve_vqgan(path)
    vq = PaellaVQ(params, dtype=torch.float32)
    loading.load_strict(vq, sd, weights)
    device = mm.vae_device()
    dtype = pick_dtype(dtype_choice, device, lambda: mm.vae_dtype(device, WORKING_DTYPES))
    return WuerstchenVQGAN(vq, weights, dtype)


# ---------------------------------------------------------------------------------------------------------------
# Sampling

def run_stage(stage: WuerstchenStage, shape, cond: torch.Tensor, uncond: torch.Tensor | None, ts: torch.Tensor,
              seed: int, cfg: float, effnet: torch.Tensor | None = None) -> torch.Tensor:
    """The pipelines' loop on ``stage``: fp32 state, CPU generator seeded with ``seed``, [cond; uncond]
    batches with lerp guidance when cfg > 1. Progress bar and interrupt per step."""
    mm.load_models_gpu([stage.patcher])
    device = stage.patcher.load_device
    dtype = stage.dtype
    guided = cfg > 1
    text = torch.cat([cond, uncond]) if guided else cond
    text = text.to(device, dtype)
    if effnet is not None:
        effnet = (torch.cat([effnet, torch.zeros_like(effnet)]) if guided else effnet).to(device, dtype)
    model = stage.module
    steps = len(ts) - 1
    bar = ProgressBar(steps)
    factors = getattr(stage, "preview_factors", None) if cli_args.preview_method != LatentPreviewMethod.NoPreviews else None

    def callback(i, x0, x_next):
        preview = None
        if factors is not None:  # Stage B latents -> RGB with factors fitted from the VQGAN (see load_decoder_previews)
            rgb = torch.nn.functional.linear(x0[0].movedim(0, -1).float().cpu(), factors[0], factors[1])
            preview = ("JPEG", Image.fromarray(((rgb + 1) * 127.5).clamp(0, 255).byte().numpy()), cli_args.preview_size)
        bar.update_absolute(i + 1, steps, preview)

    def model_fn(x, r):
        mm.throw_exception_if_processing_interrupted()
        # r stays fp32: the models embed it in fp32 (see waifukit.wuerstchen.common.r_embedding).
        if effnet is None:
            return model(x.to(dtype), r, text)
        return model(x.to(dtype), r, effnet, text)

    with torch.inference_mode():
        out = sample(model_fn, shape, ts, torch.Generator("cpu").manual_seed(seed), cfg, stage.sched, device,
                     callback=callback)
    return out.float().to(mm.intermediate_device())

