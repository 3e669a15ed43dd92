"""MEXMA-SigLIP nodes: the text-tower loader and the prompt encoder (declarations only)."""
from __future__ import annotations

import os
from pathlib import Path

import folder_paths

from . import mexma_host
from .common import CATEGORY, DTYPE_INPUT, model_file


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
    return model_file("text_encoders", name)



class MexmaSigLIPLoader:
    DESCRIPTION = ("Loads the MEXMA-SigLIP text tower (XLM-R-large) from models/text_encoders; the tokenizer "
                   "(tokenizer.json) must sit beside it.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder_name": (_text_encoder_choices(),
                                  {"tooltip": "A text-encoder file (or folder) in models/text_encoders. The tokenizer "
                                              "is looked for in <name>_tokenizer/, <name>.tokenizer.json, tokenizer/ or "
                                              "tokenizer.json beside it."}),
            "dtype": DTYPE_INPUT,
        }}

    RETURN_TYPES = ("MEXMA_SIGLIP",)
    RETURN_NAMES = ("text_encoder",)
    OUTPUT_TOOLTIPS = ("The MEXMA-SigLIP text tower and its tokenizer.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, text_encoder_name, dtype):
        return (mexma_host.load_text_encoder(_text_encoder_path(text_encoder_name), dtype),)


class MexmaSigLIPEncode:
    DESCRIPTION = ("Encodes a prompt (any of XLM-R's ~100 languages) to per-token MEXMA-SigLIP states for Waifu. "
                   "The prompt is lower-cased and stripped, as the reference pipeline does; empty is valid.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": ("MEXMA_SIGLIP", {"tooltip": "From a Waifu snapshot loader or MexmaSigLIPLoader."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                "tooltip": "The prompt. Leave empty for the negative (Waifu's default)."}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("Per-token hidden states [1,512,1024] with the attention mask in the dict.",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, text_encoder, text):
        hidden, mask = text_encoder.encode([text.lower().strip()])
        return ([[hidden, {"attention_mask": mask}]],)


NODES = {
    "MexmaSigLIPLoader": (MexmaSigLIPLoader, "Load MEXMA-SigLIP Text Encoder"),
    "MexmaSigLIPEncode": (MexmaSigLIPEncode, "MEXMA-SigLIP Text Encode"),
}
