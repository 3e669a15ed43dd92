"""Layer factory shared by every model in the pack.

Layers are built as ``operations.Linear(..., dtype=dtype, device=device)`` like ComfyUI core's
``comfy/ldm`` models, so that inside ComfyUI the host's casting/offload ops (``comfy.ops.*``) can be
passed in, while the pure-torch core defaults to plain ``torch.nn`` layers.
"""
import torch.nn as nn


class TorchOps:
    """The default ``operations``: plain torch.nn layers."""

    Linear = nn.Linear
    Conv2d = nn.Conv2d
    GroupNorm = nn.GroupNorm
    LayerNorm = nn.LayerNorm
    Embedding = nn.Embedding


def cast_like(weight, x):
    """Parameters that are used outside an op (tables, RMSNorm weights) must follow the input's
    device and dtype when a host's manual-cast ops keep weights in another dtype/device."""
    if weight is None:
        return None
    return weight.to(device=x.device, dtype=x.dtype)
