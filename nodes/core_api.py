"""Every name of ComfyUI core that this pack touches, in one place, with how we call it.

The rest of the pack imports core only through this module, so ``SURFACE`` is the whole dependency: the drift
guard (``check_surface``) resolves each entry on the running host and checks that our call binds to its
signature. It runs when the pack loads (a warning that names what changed, before an image is wrong) and in
the tests on every supported host (tests/test_host_inprocess.py). Core objects we hand to core are built
through constructors listed here, and classes we subclass (BaseModel, BASE, LatentFormat) keep core's own
methods; nothing copies a core constructor's body.

Tested hosts: ComfyUI 0.3.75 and 0.33.0 (README, "Supported ComfyUI").
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

import comfy.cli_args
import comfy.conds
import comfy.latent_formats
import comfy.lora
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.model_sampling
import comfy.ops
import comfy.sample
import comfy.samplers
import comfy.supported_models_base
import comfy.utils
import folder_paths
import latent_preview

SUPPORTED = ("0.3.75", "0.33.0")


@dataclass(frozen=True)
class Use:
    """One core name and how the pack uses it: called with ``args`` positional and ``kwargs`` keyword
    arguments (self counts for methods read off a class), or only read (``call=False``)."""
    name: str
    args: int = 0
    kwargs: tuple[str, ...] = ()
    call: bool = True


SURFACE = (
    # model folders and previews
    Use("folder_paths.get_full_path", 2),
    Use("folder_paths.get_folder_paths", 1),
    Use("folder_paths.get_filename_list", 1),
    Use("folder_paths.get_user_directory"),
    Use("latent_preview.prepare_callback", 2),
    # devices, dtypes, loading, interrupts
    Use("comfy.model_management.get_torch_device"),
    Use("comfy.model_management.unet_offload_device"),
    Use("comfy.model_management.unet_dtype", 0, ("device", "model_params", "supported_dtypes")),
    Use("comfy.model_management.unet_manual_cast", 3),
    Use("comfy.model_management.text_encoder_device"),
    Use("comfy.model_management.text_encoder_offload_device"),
    Use("comfy.model_management.text_encoder_dtype", 1),
    Use("comfy.model_management.vae_device"),
    Use("comfy.model_management.vae_offload_device"),
    Use("comfy.model_management.vae_dtype", 2),
    Use("comfy.model_management.intermediate_device"),
    Use("comfy.model_management.load_models_gpu", 1, ("memory_required",)),
    Use("comfy.model_management.soft_empty_cache"),
    Use("comfy.model_management.dtype_size", 1),
    Use("comfy.model_management.throw_exception_if_processing_interrupted"),
    # objects core drives
    Use("comfy.model_patcher.ModelPatcher", 1, ("load_device", "offload_device")),
    Use("comfy.model_patcher.ModelPatcher.set_model_sampler_post_cfg_function", 2),
    # SDXS's model sampling: core's discrete sampling and prediction classes, on the exact diffusers sigmas
    Use("comfy.model_sampling.ModelSamplingDiscrete", 0),
    Use("comfy.model_sampling.ModelSamplingDiscrete.set_sigmas", 2),
    Use("comfy.model_sampling.EPS", call=False),
    Use("comfy.model_sampling.V_PREDICTION", call=False),
    Use("comfy.model_sampling.X0", call=False),
    Use("comfy.model_patcher.ModelPatcher.get_model_object", 2),
    # LoRA: core's loader reads the adapter tensors; the patches go on a clone (base MODEL unchanged)
    Use("comfy.lora.load_lora", 2, ("log_missing",)),
    Use("comfy.model_patcher.ModelPatcher.clone", 1),
    Use("comfy.model_patcher.ModelPatcher.add_patches", 3),
    # the stock sampler loop, for MODELs whose patches our fused loops cannot apply
    Use("comfy.sample.sample_custom", 8, ("noise_mask", "callback", "disable_pbar", "seed")),
    Use("comfy.samplers.sampler_object", 1),
    Use("comfy.model_base.BaseModel", 2, ("device", "unet_model")),
    Use("comfy.model_base.BaseModel.extra_conds", 1, ()),  # we override it and call it with **kwargs
    Use("comfy.model_base.ModelType.FLOW", call=False),
    Use("comfy.model_base.ModelType.EPS", call=False),
    Use("comfy.model_base.ModelType.V_PREDICTION", call=False),
    Use("comfy.supported_models_base.BASE", 1),
    Use("comfy.supported_models_base.BASE.set_inference_dtype", 3),
    Use("comfy.conds.CONDRegular", 1),
    Use("comfy.conds.CONDRegular.can_concat", 2),  # we override both (waifu_host.CONDTokens); core calls them
    Use("comfy.conds.CONDRegular.concat", 2),
    Use("comfy.latent_formats.LatentFormat", call=False),
    Use("comfy.ops.disable_weight_init", call=False),
    Use("comfy.utils.ProgressBar", 1),
    Use("comfy.utils.ProgressBar.update_absolute", 4),
    Use("comfy.cli_args.args.preview_method", call=False),
    Use("comfy.cli_args.args.preview_size", call=False),
    Use("comfy.cli_args.LatentPreviewMethod.NoPreviews", call=False),
)


def _resolve(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(parts[0])


def check_surface(surface=SURFACE) -> list[str]:
    """What of ``surface`` the running ComfyUI lacks or would call differently: one line per name."""
    problems = []
    for use in surface:
        try:
            obj = _resolve(use.name)
        except (ImportError, AttributeError):
            problems.append(f"{use.name}: missing")
            continue
        if not use.call:
            continue
        if not callable(obj):
            problems.append(f"{use.name}: not callable")
            continue
        try:
            sig = inspect.signature(obj)
        except (TypeError, ValueError):
            continue  # builtins without a signature: nothing to check
        try:
            sig.bind(*range(use.args), **{k: None for k in use.kwargs})
        except TypeError as e:
            problems.append(f"{use.name}{sig}: our call with {use.args} positional argument(s)"
                            f"{' and ' + ', '.join(use.kwargs) if use.kwargs else ''} no longer binds ({e})")
    return problems


def host_version() -> str:
    try:
        return importlib.import_module("comfyui_version").__version__
    except (ImportError, AttributeError):
        return "unknown"


ModelPatcher = comfy.model_patcher.ModelPatcher
BaseModel = comfy.model_base.BaseModel
ModelType = comfy.model_base.ModelType
ModelSamplingDiscrete = comfy.model_sampling.ModelSamplingDiscrete
EPS = comfy.model_sampling.EPS
V_PREDICTION = comfy.model_sampling.V_PREDICTION
X0 = comfy.model_sampling.X0
BASE = comfy.supported_models_base.BASE
CONDRegular = comfy.conds.CONDRegular
LatentFormat = comfy.latent_formats.LatentFormat
disable_weight_init = comfy.ops.disable_weight_init
ProgressBar = comfy.utils.ProgressBar
cli_args = comfy.cli_args.args
LatentPreviewMethod = comfy.cli_args.LatentPreviewMethod
sample_custom = comfy.sample.sample_custom
load_lora = comfy.lora.load_lora
sampler_object = comfy.samplers.sampler_object

__all__ = ["SURFACE", "check_surface", "host_version", "mm", "folder_paths", "latent_preview", "ModelPatcher",
           "BaseModel", "ModelType", "ModelSamplingDiscrete", "EPS", "V_PREDICTION", "X0", "BASE", "CONDRegular",
           "LatentFormat", "disable_weight_init", "ProgressBar", "cli_args", "LatentPreviewMethod", "sample_custom",
           "sampler_object", "load_lora"]
