"""MEXMA-SigLIP nodes: the text-tower loader and the prompt encoder (declarations only)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..waifukit.mexma.model import PROMPT_FORMATS
from ..waifukit.registry import fetch_hint
from . import mexma_host
from .common import CATEGORY, DTYPE_INPUT, TEXT_DEVICE_INPUT, check_inputs, clean_text, model_file
from .core_api import folder_paths


def _text_encoder_choices() -> list[str]:
    files = folder_paths.get_filename_list("text_encoders")
    dirs = []
    for base in folder_paths.get_folder_paths("text_encoders"):
        if os.path.isdir(base):
            dirs += [d for d in sorted(os.listdir(base)) if os.path.isdir(os.path.join(base, d))
                     and any(f.endswith(".safetensors") for f in os.listdir(os.path.join(base, d)))]
    return files + dirs


def _text_encoder_path(name: str) -> Path:
    for base in folder_paths.get_folder_paths("text_encoders"):
        if os.path.isdir(os.path.join(base, name)):
            return Path(base) / name
    return model_file("text_encoders", name, fetch_hint("mexma-siglip"))



class MexmaSigLIPLoader:
    DESCRIPTION = ("Loads MEXMA-SigLIP from models/text_encoders: the Waifu text tower (XLM-R-large), or the full "
                   "visheratin/mexma-siglip (text tower + projector for SDXS + SigLIP vision tower for image "
                   "prompts); the tokenizer (tokenizer.json) must sit beside it.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder_name": (_text_encoder_choices(),
                                  {"tooltip": "A text-encoder file (or folder) in models/text_encoders. The tokenizer "
                                              "is looked for in <name>_tokenizer/, <name>.tokenizer.json, tokenizer/ or "
                                              "tokenizer.json beside it."}),
            "dtype": DTYPE_INPUT,
        }, "optional": {"device": TEXT_DEVICE_INPUT}}

    RETURN_TYPES = ("MEXMA_SIGLIP",)
    RETURN_NAMES = ("text_encoder",)
    OUTPUT_TOOLTIPS = ("The MEXMA-SigLIP text tower and its tokenizer.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, text_encoder_name, dtype, device="default"):
        return (mexma_host.load_text_encoder(_text_encoder_path(text_encoder_name), dtype, device=device),)


# Widget label -> waifukit.mexma.model.PROMPT_FORMATS key (labels are what saved workflows store: never rename).
PROMPT_FORMAT_CHOICES = dict(zip(("auto (each part for its model)", "lowercase + strip (Waifu)", "as typed (SDXS)"),
                                 PROMPT_FORMATS))
PROMPT_FORMAT_AUTO = next(iter(PROMPT_FORMAT_CHOICES))

IMAGE_WEIGHT_INPUT = ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05,
                                "tooltip": "0 = text only, 1 = image only. The image embedding is rescaled to the "
                                           "text embedding's length before mixing."})


class MexmaSigLIPEncode:
    DESCRIPTION = ("Encodes a prompt (any of XLM-R's ~100 languages) with MEXMA-SigLIP. One output serves both "
                   "models: the per-token states (Waifu) and, when the projector is loaded, the pooled 1152-d "
                   "embedding (SDXS); each sampler takes its part. With prompt_format auto each part is prepared as its "
                   "model's published pipeline does: lower-cased and stripped for Waifu's per-token states, as typed "
                   "for SDXS's pooled vector; empty is valid.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": ("MEXMA_SIGLIP", {"tooltip": "From a Waifu/SDXS snapshot loader or MexmaSigLIPLoader."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                "tooltip": "The prompt. Leave empty for the negative (the default of both models)."}),
        }, "optional": {
            "image": ("IMAGE", {"tooltip": "Optional image prompt (SDXS): its SigLIP embedding is mixed into the "
                                           "pooled embedding. Needs the full visheratin/mexma-siglip."}),
            "image_weight": IMAGE_WEIGHT_INPUT,
            "prompt_format": (list(PROMPT_FORMAT_CHOICES), {"default": PROMPT_FORMAT_AUTO, "tooltip": (
                "How the prompt reaches the tokenizer (XLM-R is case-sensitive). auto: as each model's published "
                "pipeline does it: the per-token states Waifu reads from the prompt lower-cased and stripped "
                "(pipeline_waifu.py), the pooled vector SDXS reads from the prompt as typed (AiArtLab/sdxs card). "
                "The other two apply one format to both parts.")}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("Per-token states [1,L,1024] (L = real tokens, up to 512) with attention_mask, plus pooled_output [1,1152] when the "
                       "projector is loaded.",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, image_weight=None):
        return check_inputs(cls, image_weight=image_weight)

    def encode(self, text_encoder, text, image=None, image_weight=0.5, prompt_format=PROMPT_FORMAT_AUTO):
        if prompt_format not in PROMPT_FORMAT_CHOICES:
            raise ValueError(f"prompt_format must be one of {list(PROMPT_FORMAT_CHOICES)}, got {prompt_format!r}")
        hidden, mask, pooled = text_encoder.encode_prompt(clean_text(text), PROMPT_FORMAT_CHOICES[prompt_format])
        extras = {"attention_mask": mask}
        if pooled is not None:
            extras["pooled_output"] = pooled
        conditioning = [[hidden, extras]]
        if image is not None:
            conditioning = mix_image(conditioning, text_encoder, image, image_weight)
        return (conditioning,)


def mix_image(conditioning, text_encoder, image, weight):
    """pooled_output = lerp(text, image, weight), the image's SigLIP embedding rescaled to the text's length;
    several images are averaged. Per-token states (Waifu's) are left unchanged."""
    text_encoder.require_projector()
    img = text_encoder.encode_images(image).mean(0, keepdim=True)
    out = []
    for tensor, extras in conditioning:
        pooled = extras.get("pooled_output")
        if pooled is None:
            raise ValueError("this conditioning has no pooled MEXMA-SigLIP embedding: encode the prompt with a "
                             "MEXMA-SigLIP that has its text_projector (missing projector weights)")
        if img.shape[-1] != pooled.shape[-1]:
            raise ValueError(f"image embedding width {img.shape[-1]} != text embedding width {pooled.shape[-1]}")
        scaled = img.to(pooled) * (pooled.norm(dim=-1, keepdim=True) / img.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        out.append([tensor, dict(extras, pooled_output=torch.lerp(pooled, scaled, float(weight)))])
    return out


class MexmaSigLIPImagePrompt:
    DESCRIPTION = ("Image prompting for SDXS: mixes the SigLIP embedding of an image into the pooled MEXMA-SigLIP "
                   "embedding of a conditioning (MEXMA-SigLIP embeds images and texts in one space). Needs the full "
                   "MEXMA-SigLIP (visheratin/mexma-siglip: vision tower + projector). The per-token states Waifu "
                   "reads are left unchanged.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": ("CONDITIONING", {"tooltip": "MexmaSigLIPEncode output (its pooled embedding is mixed)."}),
            "text_encoder": ("MEXMA_SIGLIP", {"tooltip": "The full MEXMA-SigLIP (MexmaSigLIPLoader on "
                                                         "visheratin/mexma-siglip), for its vision tower."}),
            "image": ("IMAGE", {"tooltip": "The image prompt; resized to the tower's 384x384 (bicubic). Several "
                                           "images are averaged."}),
            "weight": IMAGE_WEIGHT_INPUT,
        }}

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("The conditioning with pooled_output = lerp(text, image, weight).",)
    FUNCTION = "mix"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, weight=None):
        return check_inputs(cls, weight=weight)

    def mix(self, conditioning, text_encoder, image, weight):
        return (mix_image(conditioning, text_encoder, image, weight),)


NODES = {
    "MexmaSigLIPLoader": (MexmaSigLIPLoader, "Load MEXMA-SigLIP Text Encoder"),
    "MexmaSigLIPEncode": (MexmaSigLIPEncode, "MEXMA-SigLIP Text Encode"),
    "MexmaSigLIPImagePrompt": (MexmaSigLIPImagePrompt, "MEXMA-SigLIP Image Prompt (SDXS)"),
}
