"""ComfyUI glue for MEXMA-SigLIP: the text side (XLM-R tower + optional text_projector) and the optional SigLIP
vision tower, each in its own ModelPatcher (the vision tower only goes to the GPU when an image is encoded),
with the tokenizer.

``CONDITIONING`` is ``[[hidden [B,L,1024], {"attention_mask": [B,L], "pooled_output": [B,1152]}]]``: the
per-token states are what Waifu's DiT reads, ``pooled_output`` (present when the projector is loaded) is what
SDXS reads; each sampler picks its part.
"""
from __future__ import annotations

from pathlib import Path

import torch


from ..waifukit.mexma.model import (MISSING_PROJECTOR, MISSING_VISION, MexmaSigLIPText, SiglipVisionTower,
                              image_pixels, prompt_texts, resolve_mexma)
from ..waifukit import loading
from .common import pick_dtype
from .core_api import ModelPatcher, mm


class MexmaTextEncoder:
    """MEXMA-SigLIP with its tokenizer: ``encode`` (per-token, Waifu), ``encode_full`` (+ pooled, SDXS) and
    ``encode_images`` (SigLIP pooled image embedding)."""

    def __init__(self, module: MexmaSigLIPText, tokenizer, source: Path, load_device, offload_device,
                 vision: SiglipVisionTower | None = None, image_processing=None):
        self.module = module
        self.image_processing = image_processing
        self.tokenizer = tokenizer
        self.source = source
        self.vision = vision
        self.patcher = ModelPatcher(module, load_device=load_device, offload_device=offload_device)
        self.vision_patcher = None if vision is None else ModelPatcher(
            vision, load_device=load_device, offload_device=offload_device)

    @property
    def has_projector(self) -> bool:
        return self.module.text_projector is not None

    def encode_full(self, texts: list[str], max_length: int = 512, pad_to_longest: bool = True):
        """(hidden [B,L,H], mask [B,L], pooled [B,D] or None) on the intermediate device, float32.

        L is the longest prompt's token count (<s> ... </s>, at most max_length), not max_length: padded keys get
        no attention weight in XLM-R or in the DiT, so the real tokens' states, the pooled vector and the image
        are those of the 512-padded encoding (tests/test_xlmr.py, tests/test_fused_loop.py), at a fraction of the
        cost (XLM-R-large on CPU: ~1.8 s at 512 tokens, ~0.2 s at 24). Shorter rows stay padded and masked.
        Conds of different lengths still batch in the sampler (nodes/waifu_host.py pads them at concat)."""
        ids, mask = self.tokenizer(texts, max_length=max_length, pad_to_longest=pad_to_longest)
        mm.load_models_gpu([self.patcher])
        device = self.patcher.load_device
        with torch.inference_mode():
            hidden, pooled = self.module(ids.to(device), mask.to(device))
        out = mm.intermediate_device()
        return hidden.float().to(out), mask.to(out), None if pooled is None else pooled.float().to(out)

    def encode_prompt(self, text: str, prompt_format: str = "auto", max_length: int = 512):
        """One prompt, each part prepared for the model that reads it (waifukit.mexma.model.prompt_texts):
        (hidden [1,L,H], mask [1,L], pooled [1,D] or None)."""
        per_token, pooled_text = prompt_texts(text, prompt_format)
        hidden, mask, pooled = self.encode_full([per_token], max_length)
        if pooled is not None and pooled_text != per_token:
            pooled = self.encode_full([pooled_text], max_length)[2]
        return hidden, mask, pooled

    def encode(self, texts: list[str], max_length: int = 512):
        hidden, mask, _ = self.encode_full(texts, max_length)
        return hidden, mask

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """ComfyUI IMAGE [B,H,W,3] -> pooled SigLIP embeddings [B,D] (float32, intermediate device)."""
        if self.vision is None:
            raise ValueError(f"{self.source}: {MISSING_VISION}")
        pixels = image_pixels(self.image_processing, images, self.source)
        mm.load_models_gpu([self.vision_patcher])
        device = self.vision_patcher.load_device
        with torch.inference_mode():
            emb = self.vision(pixels.to(device=device, dtype=self.vision.embeddings.patch_embedding.weight.dtype))
        return emb.float().to(mm.intermediate_device())

    def require_projector(self):
        if not self.has_projector:
            raise ValueError(f"{self.source}: {MISSING_PROJECTOR}")


def load_text_encoder(path: Path, dtype_choice: str = "auto", tokenizer: Path | None = None,
                      device: str = "default", hint: str | None = None) -> MexmaTextEncoder:
    """``hint``: the fetch hint of the snapshot the tower comes from (default: visheratin/mexma-siglip's)."""
    res = resolve_mexma(path, tokenizer) if hint is None else resolve_mexma(path, tokenizer, hint)
    # device="cpu" keeps the text tower off the GPU (and its VRAM for the diffusion model), like core's
    # "Force CLIP device" idiom; it then also computes in fp32 under dtype auto.
    if device == "cpu":
        load_device = offload_device = torch.device("cpu")
    else:
        load_device, offload_device = mm.text_encoder_device(), mm.text_encoder_offload_device()
    dtype = pick_dtype(dtype_choice, load_device, lambda: mm.text_encoder_dtype(load_device))
    module = MexmaSigLIPText(res.text_params, res.projector_dim, res.projector_bias, dtype=dtype,
                             device=offload_device).eval()
    loading.load_strict(module, res.text_state_dict, res.source)
    vision = None
    if res.vision_params is not None:
        vision = SiglipVisionTower(res.vision_params, dtype=dtype, device=offload_device).eval()
        loading.load_strict(vision, res.vision_state_dict, res.source)
    return MexmaTextEncoder(module, res.tokenizer, res.source, load_device, offload_device, vision,
                            res.image_processing)
