"""LoRA key mapping for the Linear DiT and the SDXS UNet (pure torch; the ComfyUI layer applies the patches).

Our DiT keeps the original Sana key names with fused projections (``blocks.N.attn.qkv`` rows q|k|v,
``blocks.N.cross_attn.kv_linear`` rows k|v; see waifukit/waifu/dit.py). LoRA files name modules in one of:

- diffusers / PEFT (``train_dreambooth_lora_sana.py``, SimpleTuner, ai-toolkit):
  ``transformer.transformer_blocks.N.attn1.to_q.lora_A.weight`` / ``lora_B``; the split q/k/v of a fused weight
  map to a row range of it, which ComfyUI patches as ``(key, (dim, offset, size))``;
- kohya style: ``lora_unet_<module with _>.lora_down.weight`` / ``lora_up`` / ``.alpha``, with either our
  (Sana) module names or diffusers' ones;
- ComfyUI's own: ``diffusion_model.<module>.lora_up.weight`` / ``lora_down``.

``key_map`` gives every LoRA module prefix -> the patch key (``diffusion_model.<key>.weight`` or that with a
row range); ``unmatched`` names the file's keys no prefix claims, so nothing is dropped silently.
"""
from __future__ import annotations

import json
from typing import Union

from .waifu.dit import _DIFFUSERS_BLOCK_RENAMES, _DIFFUSERS_RENAMES

PatchKey = Union[str, tuple]

# Suffixes ComfyUI's LoRA loader reads after a module prefix (comfy/lora.py, comfy/weight_adapter/lora.py).
_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".lora_mid.weight", "_lora.up.weight", "_lora.down.weight",
             ".lora_B.weight", ".lora_A.weight", ".lora.up.weight", ".lora.down.weight",
             ".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", ".alpha", ".dora_scale",
             ".diff", ".diff_b", ".lora_B.bias", ".lora_A.bias")


def _aliases(module: str) -> list[str]:
    """The prefixes a LoRA file may use for a module named ``module`` (dotted, no .weight)."""
    flat = module.replace(".", "_")
    return [module, f"transformer.{module}", f"base_model.model.{module}", f"diffusion_model.{module}",
            f"lora_unet_{flat}", f"lora_transformer_{flat}"]


def _diffusers_names(ours: str) -> list[str]:
    """diffusers module names that are our (Sana-named) module ``ours``, whole (no fused split)."""
    names = []
    if ours.startswith("blocks."):
        i, rest = ours[len("blocks."):].split(".", 1)
        for old, new in _DIFFUSERS_BLOCK_RENAMES:
            if rest + "." == new:
                names.append(f"transformer_blocks.{i}.{old[:-1]}")
    else:
        for old, new in _DIFFUSERS_RENAMES:
            if ours + "." == new:
                names.append(old[:-1])
    return names


def key_map(weight_shapes: dict) -> dict[str, PatchKey]:
    """LoRA module prefix -> patch key, for a DiT whose Sana-layout weights (``<module>.weight`` -> shape,
    without the ``diffusion_model.`` prefix) are ``weight_shapes``."""
    out: dict[str, PatchKey] = {}
    for key, shape in weight_shapes.items():
        if not key.endswith(".weight"):
            continue
        module = key[: -len(".weight")]
        target = f"diffusion_model.{key}"
        for alias in _aliases(module):
            out[alias] = target
        for name in _diffusers_names(module):
            for alias in _aliases(name):
                out[alias] = target
        parts = module.split(".")
        if len(parts) == 4 and parts[0] == "blocks" and parts[2:] == ["attn", "qkv"]:
            rows = shape[0] // 3
            for j, c in enumerate("qkv"):
                for alias in _aliases(f"transformer_blocks.{parts[1]}.attn1.to_{c}"):
                    out[alias] = (target, (0, j * rows, rows))
        elif len(parts) == 4 and parts[0] == "blocks" and parts[2:] == ["cross_attn", "kv_linear"]:
            rows = shape[0] // 2
            for j, c in enumerate("kv"):
                for alias in _aliases(f"transformer_blocks.{parts[1]}.attn2.to_{c}"):
                    out[alias] = (target, (0, j * rows, rows))
    return out


def unet_key_map(weight_shapes: dict) -> dict[str, PatchKey]:
    """LoRA module prefix -> patch key for the SDXS UNet, whose keys are diffusers' UNet2DConditionModel names
    (waifukit/sdxs/unet.py): PEFT ``unet.<module>``, kohya ``lora_unet_<module with _>``, ComfyUI
    ``diffusion_model.<module>`` and the attention-processor names of diffusers' older ``load_attn_procs`` files
    (``<attn>.processor.to_q_lora.down.weight``, ``to_out_lora`` for ``to_out.0``)."""
    out: dict[str, PatchKey] = {}
    for key in weight_shapes:
        if not key.endswith(".weight"):
            continue
        module = key[: -len(".weight")]
        target = f"diffusion_model.{key}"
        for alias in _aliases(module) + [f"unet.{module}"]:
            out[alias] = target
        head, _, tail = module.rpartition(".")
        if tail == "0" and head.endswith(".to_out"):
            head, tail = head[: -len(".to_out")], "to_out"
        if tail in ("to_q", "to_k", "to_v", "to_out") and head.rpartition(".")[2].startswith("attn"):
            for alias in (f"{head}.processor.{tail}", f"unet.{head}.processor.{tail}"):
                out[alias] = target
    return out


def prefix_of(lora_key: str):
    """The module prefix of a LoRA tensor name, or None for a name no LoRA loader reads."""
    for suffix in _SUFFIXES:
        if lora_key.endswith(suffix):
            return lora_key[: -len(suffix)]
    return None


def unmatched(lora_sd: dict, mapping: dict) -> list[str]:
    """The LoRA file's tensor names that no module prefix of ``mapping`` claims."""
    return sorted(k for k in lora_sd if prefix_of(k) not in mapping)


def peft_alphas(lora_sd: dict, metadata: dict | None, component: str = "transformer") -> dict:
    """``<prefix>.alpha`` tensors for a PEFT file whose alpha is only in its safetensors metadata (diffusers'
    ``lora_adapter_metadata``: ``lora_alpha`` and ``r``); ComfyUI's loader reads alphas only as tensors, and
    without one scales by 1, which is PEFT's alpha == r. Per-module patterns are refused (not guessed)."""
    import torch

    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    meta = json.loads(raw)
    if not isinstance(meta, dict):
        return {}
    # A pipeline's save_lora_weights (train_dreambooth_lora_sana.py) packs the component's LoraConfig as flat
    # "<component>.<field>" keys ("transformer." / "unet."; diffusers loaders/lora_base.py
    # _pack_dict_with_prefix); a model's save_lora_adapter writes the fields bare.
    packed = {k[len(component) + 1:]: v for k, v in meta.items() if k.startswith(f"{component}.")}
    meta = packed or meta.get(component, meta)
    if meta.get("alpha_pattern") or meta.get("rank_pattern"):
        raise ValueError("lora_adapter_metadata has per-module alpha_pattern/rank_pattern, which this loader does "
                         "not apply; save the LoRA with one lora_alpha")
    alpha = meta.get("lora_alpha")
    if alpha is None:
        return {}
    out = {}
    for key in lora_sd:
        if key.endswith(".lora_A.weight"):
            prefix = key[: -len(".lora_A.weight")]
            if f"{prefix}.alpha" not in lora_sd:
                out[f"{prefix}.alpha"] = torch.tensor(float(alpha))
    return out
