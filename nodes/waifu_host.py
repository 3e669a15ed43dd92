"""ComfyUI glue for the Waifu Linear DiT: a ``BaseModel`` with FLOW model sampling (shift
from the snapshot, multiplier 1000) inside a ``ModelPatcher``, so stock samplers and memory management work on
it. ``LATENT["samples"]`` holds raw VAE latents; the 0.18215 scaling lives in the latent format, as in core.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch


from ..kernels import linear_attention
from ..kernels.fused import token_mask
from ..waifukit import loading, lora
from ..waifukit.registry import MODELS
from ..waifukit.waifu.dit import LinearDiT
from .common import WEIGHT_DTYPES, param_count, pick_dtype
from .vae16_host import Latent16
from .core_api import BASE, BaseModel, CONDRegular, ModelPatcher, ModelType, load_lora, mm


class WaifuConfig(BASE):
    unet_config = {}
    unet_extra_config = {}
    latent_format = Latent16  # 0.18215, no shift: as Waifu was trained
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]
    memory_usage_factor = 2.0

    def __init__(self, params, shift: float):
        super().__init__({"params": params})
        self.sampling_settings = {"shift": float(shift), "multiplier": 1000}


class CONDTokens(CONDRegular):
    """A per-token cond ([B, L, ...]: caption states or their mask) that batches with others of any length L.

    MexmaSigLIPEncode emits each prompt at its own length, so a prompt and its negative rarely match. Core's
    CONDCrossAttn would repeat the shorter caption up to the lcm of the lengths (refusing beyond 4x) and the
    mask, a CONDRegular, would refuse any mismatch, so cond and uncond would run as separate model calls.
    Here both the states and the mask are padded with zeros to the longest: the padded keys are masked (-10000
    bias, softmax weight exactly 0), so one batched call gives the separate calls' result."""

    def can_concat(self, other):
        a, b = self.cond, other.cond
        return (isinstance(other, CONDTokens) and a.ndim == b.ndim and a.shape[0] == b.shape[0]
                and a.shape[2:] == b.shape[2:] and a.device == b.device)

    def concat(self, others):
        conds = [self.cond] + [o.cond for o in others]
        n = max(c.shape[1] for c in conds)
        return torch.cat([c if c.shape[1] == n else torch.cat([c, c.new_zeros((c.shape[0], n - c.shape[1],
                                                                                 *c.shape[2:]))], dim=1)
                          for c in conds])


class WaifuDiT(BaseModel):
    def __init__(self, model_config, device=None):
        # The DiT calls the pack's kernels (Triton on CUDA, the tuned eager twin elsewhere) for its attention.
        super().__init__(model_config, ModelType.FLOW, device=device,
                         unet_model=functools.partial(LinearDiT, attention=linear_attention))

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        cross_attn = kwargs.get("cross_attn")
        if cross_attn is not None:
            # States and mask travel as a pair that pads together (CONDTokens); a missing mask is all ones, and
            # one shorter than the states (ConditioningConcat keeps the first mask) is extended with ones.
            out["c_crossattn"] = CONDTokens(cross_attn)
            out["attention_mask"] = CONDTokens(token_mask(cross_attn, kwargs.get("attention_mask")))
        return out


def load_dit(path: Path, dtype_choice: str = "auto", default_shift: float = MODELS["waifu-2b"]["default_shift"],
             weight_dtype: str = "default"):
    """A ComfyUI MODEL (ModelPatcher around WaifuDiT) from any supported transformer layout. ``weight_dtype``
    (WEIGHT_DTYPES) stores the weights in fp8 and computes in the chosen dtype, as ComfyUI's UNETLoader does."""
    res = loading.resolve_linear_dit(path)
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    supported = WaifuConfig.supported_inference_dtypes
    dtype = pick_dtype(dtype_choice, load_device,
                       lambda: mm.unet_dtype(model_params=param_count(res.state_dict), supported_dtypes=supported))
    manual_cast = mm.unet_manual_cast(dtype, load_device, supported)
    config = WaifuConfig(res.params, res.extra["shift"] or default_shift)
    storage = WEIGHT_DTYPES[weight_dtype]
    if storage is not None:
        # fp8 storage; compute as the same load without fp8 would (dtype, or its manual cast where the device
        # lacks it): every layer casts its weights on the fly (comfy.ops manual cast).
        manual_cast, dtype = manual_cast or dtype, storage
        config.optimizations["fp8"] = weight_dtype.endswith("_fast")
    config.set_inference_dtype(dtype, manual_cast)
    model = WaifuDiT(config, device=offload_device)
    loading.load_strict(model.diffusion_model, res.state_dict, res.source)
    model.waifu_source = str(res.source)
    logging.info("comfyui-waifu: Linear DiT from %s (%s, shift %s)", res.source, dtype, config.sampling_settings["shift"])
    return ModelPatcher(model, load_device=load_device, offload_device=offload_device)




# ModelPatcher state the fused loop honours: the model-sampling object patch (shift, multiplier) and weight
# patches (LoRA), which load_models_gpu applies to the weights the loop runs on.
_HONOURED_OBJECTS = {"model_sampling"}


def unsupported_patches(model) -> list[str]:
    """Names of the MODEL's patches that our fused loop would not apply (sampler wrappers, CFG functions,
    attention/block patches, other object patches, hooks), as a user can recognise them."""
    found = []
    opts = getattr(model, "model_options", {}) or {}
    for key, value in opts.items():
        if key == "transformer_options":
            for tkey, tvalue in (value or {}).items():
                if tkey in ("patches", "patches_replace") and tvalue:
                    for kind, entries in tvalue.items():
                        if entries:
                            found.append(f"transformer_options.{tkey}.{kind}")
                elif tkey in ("wrappers", "callbacks") and any(tvalue.values()):
                    found.append(f"transformer_options.{tkey}")
        elif key.startswith("disable_cfg1_optimization"):
            continue
        elif value is not None and value != [] and value != {}:
            found.append(key)
    found += [f"object patch {k}" for k in getattr(model, "object_patches", {}) if k not in _HONOURED_OBJECTS]
    for attr in ("wrappers", "callbacks"):
        entries = getattr(model, attr, None) or {}
        if any(bool(v) for v in entries.values()):
            found.append(f"model {attr}")
    if getattr(model, "hook_patches", None):
        found.append("hook patches")
    return found


def apply_lora(model, path: Path, strength: float, key_map=lora.key_map, what: str = "Linear DiT",
               kind: str = "Waifu/Sana LoRA", component: str = "transformer"):
    """A clone of ``model`` with the LoRA file at ``path`` added as weight patches at ``strength`` (ComfyUI's
    patch system: the base MODEL stays unpatched for other branches). Every LoRA layout of waifukit.lora maps;
    keys that map to nothing are named in a warning, and a file where nothing maps is refused. ``key_map`` /
    ``what`` / ``kind`` / ``component`` name the model family (defaults: the Linear DiT; SDXS passes its own)."""
    sd = loading.read_state_dict(path)
    metadata = None
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
    try:
        sd.update(lora.peft_alphas(sd, metadata, component))
    except ValueError as e:
        raise loading.CheckpointError(f"{path}: {e}") from None
    shapes = {k: tuple(v.shape) for k, v in model.model.diffusion_model.state_dict().items()}
    mapping = key_map(shapes)
    missing = lora.unmatched(sd, mapping)
    if len(missing) == len(sd):
        raise loading.CheckpointError(
            f"{path}: none of its {len(sd)} tensors names a module of this {what} (first: "
            f"{', '.join(missing[:3])}); it is not a {kind} in the diffusers (PEFT), kohya or ComfyUI layout")
    if missing:
        logging.warning("comfyui-waifu: LoRA %s: %d key(s) match no module of the %s and are NOT applied: %s",
                        path.name, len(missing), what, ", ".join(missing))
    present = {lora.prefix_of(k) for k in sd}
    patches = load_lora(sd, {p: t for p, t in mapping.items() if p in present}, log_missing=False)
    patched = model.clone()
    patched.add_patches(patches, strength)
    return patched
