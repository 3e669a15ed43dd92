"""Shared pieces of the ComfyUI layer: dtype choice, model-folder lookups, the category."""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch


from ..waifukit.loading import CheckpointError
from ..waifukit.registry import FETCH_HINT
from .core_api import folder_paths

CATEGORY = "waifu"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_CHOICES = ["auto", "fp32", "bf16", "fp16"]
DTYPE_INPUT = (DTYPE_CHOICES, {"default": "auto", "tooltip": "Weight/compute dtype. auto: fp32 on CPU, "
                                                             "bf16 (or fp16) on GPUs, as ComfyUI decides."})


def param_count(sd: dict) -> int:
    return sum(t.numel() for t in sd.values())


def pick_dtype(choice: str, device, auto):
    """The loaders' dtype widget: an explicit choice wins; auto is fp32 on CPU (the pack's faithful eager
    path; ComfyUI would pick fp16 for text encoders there) and ComfyUI's own pick on accelerators."""
    if choice != "auto":
        return DTYPES[choice]
    if torch.device(device).type == "cpu":
        return torch.float32
    return auto()



# ComfyUI's UNETLoader choices: weights stored in fp8, computed in the `dtype` widget's dtype (cast per layer).
WEIGHT_DTYPES = {"default": None, "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fn_fast": torch.float8_e4m3fn,
                 "fp8_e5m2": torch.float8_e5m2}
WEIGHT_DTYPE_INPUT = (list(WEIGHT_DTYPES), {"default": "default",
                                            "tooltip": "Weight storage, as ComfyUI's UNETLoader: fp8 halves the "
                                                       "resident weights against bf16 (computed in `dtype`, cast "
                                                       "per layer; slightly different images). _fast also uses "
                                                       "fp8 matmuls on GPUs that have them."})

TEXT_DEVICE_INPUT = (["default", "cpu"], {"default": "default",
                                          "tooltip": "Where the text encoder runs: default follows ComfyUI's model "
                                                     "management; cpu keeps it off the GPU to save VRAM."})

# Inputs every sampler of ours shares (same meaning, same tooltip).
BATCH_SIZE_INPUT = ("INT", {"default": 1, "min": 1, "max": 64,
                            "tooltip": "Images per run. Ignored when latent_image is given."})
DENOISE_INPUT = ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                           "tooltip": "1.0 = text-to-image. Below 1 with latent_image: image-to-image, running the "
                                      "last `steps` of a steps/denoise schedule."})
LATENT_IMAGE_INPUT = ("LATENT", {"tooltip": "Start from this latent (VAEEncode of an image) for img2img; sets size "
                                            "and batch."})
RAW_LATENT_TOOLTIP = "Raw 16-channel VAE latents (decode with AuraVAE16Decode or VAEDecode)."


def check_side(name: str, value, multiple: int, lowest: int, highest: int, why: str):
    """A validation message for an image side that is off the model's grid (with the nearest valid value), or
    None. Used from VALIDATE_INPUTS, which turns off ComfyUI's own range check for the inputs it names."""
    if value is None:  # a link: its value is only known when the node runs
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{name} must be a whole number; got {_shown(value)} ({type(value).__name__})"
    if value % multiple or not lowest <= value <= highest:
        nearest = min(max(lowest, round(value / multiple) * multiple), highest)
        return (f"{name} must be a multiple of {multiple} between {lowest} and {highest} ({why}); got {value}, "
                f"nearest valid: {nearest}")
    return None


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_value(name: str, value, kind: str, opts: dict):
    """A message naming ``name`` for a widget value ComfyUI's own checks let through, or None. ComfyUI's min/max
    comparisons are all False for NaN (and its API takes JSON NaN/Infinity), and it skips min/max for inputs a
    VALIDATE_INPUTS names; a value it could not convert reaches us unconverted. Never raises."""
    if value is None:  # a link
        return None
    if kind in ("FLOAT", "INT"):
        want = "a number" if kind == "FLOAT" else "a whole number"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "INT" and isinstance(value, float)):
            return f"{name} must be {want}; got {_shown(value)} ({type(value).__name__})"
        if not math.isfinite(value):
            return f"{name} must be a finite number; got {value} (NaN and infinities are refused)"
        lo, hi = opts.get("min"), opts.get("max")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            return f"{name} must be between {lo} and {hi}; got {value}"
    elif kind == "STRING" and not isinstance(value, str):
        return f"{name} must be text; got {type(value).__name__}"
    return None


def check_inputs(cls, **values):
    """The body of our nodes' VALIDATE_INPUTS: every value named is checked against the node's INPUT_TYPES entry
    (check_value); True or the first message. tests/test_reliability.py requires every FLOAT input of every node
    to be named (NaN would otherwise pass ComfyUI's range check)."""
    spec = cls.INPUT_TYPES()
    declared = {**spec.get("required", {}), **spec.get("optional", {})}
    for name, value in values.items():
        kind, *opts = declared[name]
        problem = check_value(name, value, kind, opts[0] if opts else {})
        if problem:
            return problem
    return True


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """Text inputs: lone UTF-16 surrogates (valid JSON escapes such as "\\ud800", but not Unicode characters, so
    tokenizers cannot take them) become U+FFFD, as a UTF-8 decoder's errors="replace" does; all else is kept."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def start_latent(latent_image, fmt, family: str):
    """(shape, raw latents) of an optional LATENT input, checked against the model's latent format."""
    start = latent_image["samples"]
    if start.ndim != 4 or start.shape[1] != fmt.latent_channels:
        raise ValueError(f"latent_image has shape {tuple(start.shape)}; {family} needs {fmt.latent_channels}-channel "
                         f"latents [B,{fmt.latent_channels},H/8,W/8]")
    return tuple(start.shape), start


def model_file(kind: str, name: str, hint: str = FETCH_HINT) -> Path:
    """Full path of a file listed in a ComfyUI model folder, or a CheckpointError naming it and the fix."""
    path = folder_paths.get_full_path(kind, name)
    if path is None:
        raise CheckpointError(f"models/{kind}/{name}: file not found. {hint}")
    return Path(path)


def diffusers_folders(accept) -> list[str]:
    """Folders under models/diffusers (two levels deep at most) for which ``accept(Path)`` is true."""
    found = []
    for base in folder_paths.get_folder_paths("diffusers"):
        if not os.path.isdir(base):
            continue
        for root, dirs, _ in os.walk(base, followlinks=True):
            rel = os.path.relpath(root, base)
            if rel != "." and accept(Path(root)):
                found.append(rel)
                dirs[:] = []
            elif rel.count(os.sep) >= 1:
                dirs[:] = []
    return sorted(found)


def diffusers_folder(name: str, accept, what: str, hint: str = FETCH_HINT) -> Path:
    for base in folder_paths.get_folder_paths("diffusers"):
        path = Path(base) / name
        if accept(path):
            return path
    raise CheckpointError(f"models/diffusers/{name}: no {what} there. {hint}")


def lora_loader_inputs(model_what: str) -> dict:
    """INPUT_TYPES of our LoRA loaders (same widgets and meaning as the stock LoraLoaderModelOnly)."""
    return {"required": {
        "model": ("MODEL", {"tooltip": f"{model_what} (the input MODEL itself stays unpatched)."}),
        "lora_name": (folder_paths.get_filename_list("loras"),
                      {"tooltip": "A LoRA file in models/loras (.safetensors preferred)."}),
        "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                               "tooltip": "LoRA scale (diffusers' lora_scale); 0 returns the MODEL unchanged."}),
    }}


class LoraLoaderBase:
    """What our LoRA loaders share with the stock LoraLoaderModelOnly: its widgets (lora_loader_inputs), one MODEL
    out, strength 0 returning the MODEL unchanged, validation of every FLOAT. A subclass names its model
    (MODEL_WHAT), may refuse another family's MODEL (check_model) and applies the patch (apply)."""
    MODEL_WHAT = "A MODEL"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The MODEL with the LoRA patched in (applied when a sampler loads it).",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return lora_loader_inputs(cls.MODEL_WHAT)

    @classmethod
    def VALIDATE_INPUTS(cls, strength=None):
        return check_inputs(cls, strength=strength)

    def check_model(self, model):
        pass

    def apply(self, model, path: Path, strength: float):
        raise NotImplementedError

    def load(self, model, lora_name, strength):
        self.check_model(model)
        path = model_file("loras", lora_name)
        if strength == 0:  # as the stock LoRA loaders: nothing to patch
            return (model,)
        return (self.apply(model, path, strength),)
