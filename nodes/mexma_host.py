"""ComfyUI glue for the MEXMA-SigLIP text tower: the module in a ModelPatcher, with its tokenizer.
``CONDITIONING`` is ``[[hidden [B,L,1024], {"attention_mask": [B,L]}]]``."""
from __future__ import annotations

from pathlib import Path

import torch

import comfy.model_management as mm
import comfy.model_patcher

from ..waifukit import loading
from ..waifukit.xlmr import XLMRobertaTextModel
from .common import pick_dtype


class MexmaTextEncoder:
    """The MEXMA-SigLIP text tower (XLM-R) with its tokenizer, kept in a ModelPatcher."""

    def __init__(self, module: XLMRobertaTextModel, tokenizer, source: Path, load_device, offload_device):
        self.module = module
        self.tokenizer = tokenizer
        self.source = source
        self.patcher = comfy.model_patcher.ModelPatcher(module, load_device=load_device, offload_device=offload_device)

    def encode(self, texts: list[str], max_length: int = 512):
        ids, mask = self.tokenizer(texts, max_length=max_length)
        mm.load_models_gpu([self.patcher])
        device = self.patcher.load_device
        with torch.inference_mode():
            hidden = self.module(ids.to(device), mask.to(device))
        out = mm.intermediate_device()
        return hidden.float().to(out), mask.to(out)


def load_text_encoder(path: Path, dtype_choice: str = "auto", tokenizer: Path | None = None) -> MexmaTextEncoder:
    res = loading.resolve_text_encoder(path, tokenizer)
    load_device, offload_device = mm.text_encoder_device(), mm.text_encoder_offload_device()
    dtype = pick_dtype(dtype_choice, load_device, lambda: mm.text_encoder_dtype(load_device))
    module = XLMRobertaTextModel(res.params, dtype=dtype, device=offload_device).eval()
    loading.load_strict(module, res.state_dict, res.source)
    return MexmaTextEncoder(module, res.extra["tokenizer"], res.source, load_device, offload_device)


